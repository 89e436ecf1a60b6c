"""TCP, UDP and ICMP echo from the guest to the host's loopback (10.0.2.2): echo,
refusal, many concurrent connections, ping, and --disable-host-loopback."""

from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, Slirp, StartSlirp

pytestmark = pytest.mark.e2e

UDP_ECHO = """
import json, socket, sys
addr = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
results = []
for size in (1, 1400, 8000, 30000):  # the last two are fragmented at MTU 1500
    data = bytes((i * 7 + size) & 0xFF for i in range(size))
    s.sendto(data, addr)
    reply, src = s.recvfrom(65535)
    results.append([size, reply == data, src[0], src[1]])
print(json.dumps(results))
"""


def test_udp_echo(host: Host, guest: Guest, slirp: Slirp) -> None:
    out = guest.python(UDP_ECHO, GATEWAY, str(host.echo)).stdout
    for size, same, src_ip, src_port in json.loads(out):
        assert same, f"{size}-byte datagram came back changed"
        assert (src_ip, src_port) == (GATEWAY, host.echo)


CONNECT = """
import errno, socket, sys
s = socket.socket()
s.settimeout(30)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno))
else:
    print("connected")
"""


def test_refused_port_is_refused_at_once(host: Host, guest: Guest, slirp: Slirp) -> None:
    # Refused (an RST), not a timeout and not an unreachable: what the host's kernel said.
    assert guest.python(CONNECT, GATEWAY, str(host.dead)).stdout.strip() == "ECONNREFUSED"
    proc = guest.run(["curl", "-sS", "--max-time", "30", f"http://{GATEWAY}:{host.dead}/"],
                     check=False)
    assert proc.returncode == 7, proc.stderr  # curl: "Failed to connect"


#: One datagram to ADDR PORT (IPv4 or IPv6); says what came back: a reply, the ICMP
#: error as ECONNREFUSED, or nothing.
UDP_REFUSED = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"anyone?")
try:
    s.recv(100)
    print("reply")
except ConnectionRefusedError:
    print("ECONNREFUSED")
except TimeoutError:
    print("timeout")
"""


def test_udp_to_a_closed_port_is_refused(host: Host, guest: Guest, slirp: Slirp) -> None:
    """The host kernel's port-unreachable comes back to the guest as an ICMP error."""
    assert guest.python(UDP_REFUSED, GATEWAY, str(host.dead)).stdout.strip() == "ECONNREFUSED"


#: One socket: a datagram to a closed port (refused), then one to the echo server;
#: prints what each got.
UDP_AFTER_REFUSAL = """
import socket, sys
host, dead, echo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect((host, dead))
s.send(b"anyone?")
try:
    s.recv(100)
    first = "reply"
except ConnectionRefusedError:
    first = "ECONNREFUSED"
except TimeoutError:
    first = "timeout"
s.connect((host, echo))  # the same socket, so the same flow through pyslirp
second = "timeout"
for _ in range(3):
    s.send(b"still there?")
    try:
        if s.recv(100) == b"still there?":
            second = "echoed"
            break
    except TimeoutError:
        pass
print(first, second)
"""


def test_a_udp_flow_refused_once_still_gets_replies(host: Host, guest: Guest,
                                                    slirp: Slirp) -> None:
    """A guest socket whose datagram met a closed port (ICMP port unreachable) still
    gets its replies from another port afterwards.

    (Before, under uvloop, the error's POLLERR stopped the flow's host socket reader
    for good: the echo came back to pyslirp and was never read.)"""
    out = guest.python(UDP_AFTER_REFUSAL, GATEWAY, str(host.dead), str(host.echo)).stdout
    assert out.split() == ["ECONNREFUSED", "echoed"]


MANY = """
import asyncio, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def one(i, barrier):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
    await asyncio.wait_for(barrier.wait(), 120)  # all n connections are open at once here
    msg = (f"connection {i} " * 50).encode()
    writer.write(msg)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(msg)), 60)
    writer.close()
    await writer.wait_closed()
    return got == msg

async def main():
    barrier = asyncio.Barrier(n)
    results = await asyncio.gather(*(one(i, barrier) for i in range(n)), return_exceptions=True)
    bad = [repr(r) for r in results if r is not True]
    print(n - len(bad), bad[:5])

asyncio.run(main())
"""


def test_500_concurrent_connections(host: Host, guest: Guest, slirp: Slirp) -> None:
    out = guest.python(MANY, GATEWAY, str(host.echo), "500", timeout=240).stdout
    assert out.startswith("500 []"), out


UDP_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recv(100).decode())
except TimeoutError:
    print("no reply")
"""


def test_disable_host_loopback(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp("--disable-host-loopback")
    # TCP: an immediate "unreachable" from pyslirp, not a connection and not a timeout.
    assert guest.python(CONNECT, GATEWAY, str(host.echo)).stdout.strip() in (
        "EHOSTUNREACH", "ENETUNREACH")
    # UDP: dropped; the echo server never sees it.
    token = f"blocked-{uuid.uuid4().hex}"
    assert guest.python(UDP_ONCE, GATEWAY, str(host.echo), token).stdout.strip() == "no reply"
    assert token not in host.echo_log()


@pytest.mark.parametrize("addr", [GATEWAY, "10.0.2.3"])
def test_ping(guest: Guest, slirp: Slirp, addr: str) -> None:
    proc = guest.run(["ping", "-n", "-c", "2", "-W", "5", addr], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 received" in proc.stdout
