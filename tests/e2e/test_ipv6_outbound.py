"""``--outbound-addr6=ADDR|IFNAME``: the source of the guest's IPv6 flows, as a server sees it.

A *server* namespace on a veth with 2001:db8::/32 test addresses (2001:db8:6::2;
the host end 2001:db8:6::1) runs a TCP and UDP server that answers the address
it saw. The outbound address lives on another interface of the host namespace
(2001:db8:7::1, not the veth's), so the kernel would never pick it by itself:
seeing it proves pyslirp bound the socket to it. The guest reaches the server
through pyslirp with ``-6`` over SLAAC.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import READY_TIMEOUT, Guest, Host, StartSlirp, pyslirp_argv
from tests.e2e.test_ipv6 import _wait_for_slaac
from tests.nsutil import NetNS, veth

pytestmark = pytest.mark.e2e

SERVER6 = "2001:db8:6::2"
HOST6 = "2001:db8:6::1"
OUTBOUND6 = "2001:db8:7::1"
PORT = 7000

#: TCP and UDP on [::]:PORT, answering "PROTO PEER-ADDRESS".
SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])

def udp(s):
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(f"udp {peer[0]}".encode(), peer)

u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.bind(("::", port))
threading.Thread(target=udp, args=(u,), daemon=True).start()
t = socket.socket(socket.AF_INET6)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", port))
t.listen()
print("ready", flush=True)
while True:
    c, peer = t.accept()
    with c:
        c.sendall(f"tcp {peer[0]}".encode())
"""

#: In the guest: ask the server over TCP and UDP what it saw.
ASK = r"""
import socket, sys
addr = (sys.argv[1], int(sys.argv[2]))
t = socket.create_connection(addr, timeout=20)
print(t.recv(100).decode())
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(3)
for _ in range(5):
    u.sendto(b"?", addr)
    try:
        print(u.recv(100).decode())
        break
    except TimeoutError:
        continue
"""


@pytest.fixture
def server6(host: Host) -> Iterator[NetNS]:
    """The server namespace, and the outbound address on an interface of the host's."""
    tag = os.getpid() % 10000
    link, out0, out1 = f"s6h{tag}", f"ob6a{tag}", f"ob6b{tag}"
    with NetNS("server6") as ns:
        veth(host.ns, link, ns, "eth0")
        host.run(["ip", "-6", "addr", "add", f"{HOST6}/64", "dev", link, "nodad"])
        ns.run(["ip", "-6", "addr", "add", f"{SERVER6}/64", "dev", "eth0", "nodad"])
        ns.run(["ip", "-6", "route", "add", "2001:db8:7::/64", "via", HOST6])
        host.run(["ip", "link", "add", out0, "type", "veth", "peer", "name", out1])
        try:
            host.run(["ip", "-6", "addr", "add", f"{OUTBOUND6}/64", "dev", out0, "nodad"])
            for name in (out0, out1):
                host.run(["ip", "link", "set", name, "up"])
            proc = ns.popen([sys.executable, "-c", SERVER, str(PORT)], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
            try:
                assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
                ns.outbound_ifname = out0  # type: ignore[attr-defined]
                yield ns
            finally:
                proc.kill()
                proc.wait()
        finally:
            host.run(["ip", "link", "del", out0], check=False)


def _ask(guest: Guest) -> list[str]:
    _wait_for_slaac(guest)
    return guest.python(ASK, SERVER6, str(PORT)).stdout.split("\n")[:2]


def test_without_outbound_addr6_the_kernel_picks_the_veth_address(
        start_slirp: StartSlirp, guest: Guest, server6: NetNS) -> None:
    start_slirp("-6")
    assert _ask(guest) == [f"tcp {HOST6}", f"udp {HOST6}"]


def test_outbound_addr6_is_the_source_the_server_sees(
        start_slirp: StartSlirp, guest: Guest, server6: NetNS) -> None:
    slirp = start_slirp("-6", f"--outbound-addr6={OUTBOUND6}")
    assert _ask(guest) == [f"tcp {OUTBOUND6}", f"udp {OUTBOUND6}"]
    assert f"outbound address: {OUTBOUND6}" in slirp.log_text()


def test_outbound_addr6_by_interface_name(
        start_slirp: StartSlirp, guest: Guest, server6: NetNS) -> None:
    ifname = server6.outbound_ifname  # type: ignore[attr-defined]
    start_slirp("-6", f"--outbound-addr6={ifname}")
    assert _ask(guest) == [f"tcp {OUTBOUND6}", f"udp {OUTBOUND6}"]


@pytest.mark.parametrize(("value", "message"), [
    ("2001:db8:ffff::1", "--outbound-addr6=2001:db8:ffff::1: cannot bind to it: Cannot assign "
                         "requested address (not an address of this host?)"),
    ("10.0.2.2", "--outbound-addr6=10.0.2.2: not an IPv6 address"),
    ("nosuchif6", "--outbound-addr6=nosuchif6: no such interface (expected an IPv6 address or "
                  "an interface name)"),
    ("", "--outbound-addr6 needs an IPv6 address or an interface name"),
])
def test_bad_outbound_addr6_is_a_one_line_error(host: Host, guest: Guest, tmp_path: Path,
                                                value: str, message: str) -> None:
    argv = pyslirp_argv("-6", f"--outbound-addr6={value}", str(guest.pid), "tap0")
    done = host.ns.run(argv, check=False, timeout=READY_TIMEOUT)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].endswith(message), done.stderr
