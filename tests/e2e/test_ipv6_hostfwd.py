"""IPv6 port forwarding through ``--api-socket`` (pyslirp's extension, with ``-6``), end to end.

pyslirp serves the guest with ``-6 -c`` (its kernel forms a SLAAC address from
our router advertisements); a server in the guest listens on ``::`` (TCP and
UDP, dual-stack) and answers who it saw and on which of its addresses. Host
clients connect to ``[::1]``, to ``127.0.0.1`` (a dual-stack ``::`` forward)
and, from a *peer* namespace on a veth with 2001:db8::/32 test addresses, to
the host's IPv6 address (a client whose address the guest can route back to:
it keeps it).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import TAP, Guest, Host, Slirp, StartSlirp
from tests.e2e.test_hostfwd import api, port_unused_in, start_guest_server
from tests.e2e.test_ipv6 import _wait_for_slaac
from tests.nsutil import NetNS, veth

pytestmark = pytest.mark.e2e

GUEST_PORT = 8000
GATEWAY6 = "fd00::2"
HOST6 = "2001:db8:6::1"
PEER6 = "2001:db8:6::2"
_names = itertools.count()

#: In the guest: TCP and UDP on [::]:port (dual-stack). TCP reads one command line:
#: WHO (answers "PEER LOCAL"), GET (sends the payload file), PUT (hashes up to EOF).
#: UDP answers "PEER " + the datagram. Addresses as [v6]:port or v4:port.
GUEST_SERVER = r"""
import hashlib, socket, sys, threading
port, payload = int(sys.argv[1]), sys.argv[2]

def fmt(addr):
    host = addr[0].removeprefix("::ffff:") if "." in addr[0] else addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"

def serve(c, peer):
    with c:
        f = c.makefile("rb")
        cmd = f.readline().strip()
        if cmd == b"WHO":
            c.sendall(f"{fmt(peer)} {fmt(c.getsockname())}\n".encode())
        elif cmd == b"GET":
            with open(payload, "rb") as p:
                c.sendfile(p)
        elif cmd == b"PUT":
            h, n = hashlib.sha256(), 0
            while chunk := f.read1(1 << 20):
                h.update(chunk)
                n += len(chunk)
            c.sendall(f"{n} {h.hexdigest()}\n".encode())

def tcp(ls):
    while True:
        c, peer = ls.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()

def udp(us):
    while True:
        data, peer = us.recvfrom(65535)
        us.sendto(f"{fmt(peer)} ".encode() + data, peer)

def bound(kind):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port))
    return s

ls = bound(socket.SOCK_STREAM)
ls.listen(128)
threading.Thread(target=udp, args=(bound(socket.SOCK_DGRAM),), daemon=True).start()
print("ready", flush=True)
tcp(ls)
"""

#: On the host side (or the peer): one exchange with a forwarded port; prints JSON.
CLIENT = r"""
import hashlib, json, socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
arg = sys.argv[4] if len(sys.argv) > 4 else ""

def fmt(a):
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

if mode == "udp":
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((addr, port))
    replies = []
    for size in (5, 1200):
        data = bytes((i * 7 + size) & 0xFF for i in range(size))
        for _ in range(6):  # UDP: retry a lost datagram
            s.send(data)
            try:
                reply = s.recv(65535)
                break
            except TimeoutError:
                continue
        seen, _, echoed = reply.partition(b" ")
        replies.append([size, echoed == data, seen.decode()])
    print(json.dumps({"me": fmt(s.getsockname()), "replies": replies}))
    sys.exit()
s = socket.create_connection((addr, port), timeout=120)
out = {"me": fmt(s.getsockname())}
s.sendall({"who": b"WHO\n", "get": b"GET\n", "put": b"PUT\n"}[mode])
if mode == "put":
    with open(arg, "rb") as f:
        s.sendfile(f)
s.shutdown(socket.SHUT_WR)
h, n, data = hashlib.sha256(), 0, b""
while chunk := s.recv(1 << 20):
    if mode == "get":
        h.update(chunk)
        n += len(chunk)
    else:
        data += chunk
out["reply"] = f"{n} {h.hexdigest()}" if mode == "get" else data.decode().strip()
print(json.dumps(out))
"""


def client(ns: Any, *args: str, timeout: float = 300) -> dict[str, Any]:
    out = ns.run([sys.executable, "-c", CLIENT, *args], timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def add(path: Path, **arguments: Any) -> bytes:
    return api(path, {"execute": "add_hostfwd", "arguments": {"guest_port": GUEST_PORT,
                                                               **arguments}})


def listing(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(api(path, b'{"execute":"list_hostfwd"}'))[
        "entries"]
    return entries


def port_of(who: dict[str, Any]) -> str:
    return str(who["me"].rsplit(":", 1)[1])


def add_tcp_and_udp(path: Path, host_addr: str, port: int) -> None:
    """Forwards 1 (TCP) and 2 (UDP) from ``host_addr``'s ``port`` to the guest's server."""
    assert add(path, proto="tcp", host_addr=host_addr, host_port=port) == b'{"return":{"id":1}}'
    assert add(path, proto="udp", host_addr=host_addr, host_port=port) == b'{"return":{"id":2}}'


def udp_sources(out: dict[str, Any]) -> set[str]:
    """Where the guest's server saw the client's datagrams come from; both sizes must have
    come back intact."""
    assert [r[:2] for r in out["replies"]] == [[5, True], [1200, True]]
    return {r[2] for r in out["replies"]}


@pytest.fixture
def served6(start_slirp: StartSlirp, guest: Guest, tmp_path: Path) -> tuple[Slirp, Path, str]:
    """pyslirp -6 -c with an API socket; the guest's SLAAC address."""
    path = tmp_path / "api.sock"
    slirp = start_slirp("-6", "--api-socket", str(path))
    return slirp, path, _wait_for_slaac(guest)


@pytest.fixture
def guest_server(host: Host, guest: Guest) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_guest_server(host, guest, GUEST_SERVER)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def peer6(host: Host) -> Iterator[NetNS]:
    """A namespace joined to the host namespace by a veth: 2001:db8:6::2 -> 2001:db8:6::1."""
    n = next(_names)
    name = f"p6h{os.getpid() % 10000}x{n}"
    with NetNS("peer6") as ns:
        veth(host.ns, name, ns, "eth0")
        host.run(["ip", "-6", "addr", "add", f"{HOST6}/64", "dev", name, "nodad"])
        ns.run(["ip", "-6", "addr", "add", f"{PEER6}/64", "dev", "eth0", "nodad"])
        yield ns


# ---- TCP and UDP ------------------------------------------------------------------------

def test_tcp_from_host_loopback_reaches_the_guest_ipv6_address_and_carries_the_payload(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path, guest6 = served6
    port = port_unused_in(host)
    assert add(path, proto="tcp", host_addr="::1", host_port=port) == b'{"return":{"id":1}}'
    # No guest_addr: the forward follows the guest's IPv6 address, and says which it is.
    assert listing(path) == [{"id": 1, "proto": "tcp", "host_addr": "::1", "host_port": port,
                              "guest_addr": guest6, "guest_port": GUEST_PORT}]
    who = client(host.ns, "who", "::1", str(port))
    seen, local = who["reply"].split()
    assert seen == f"[{GATEWAY6}]:{port_of(who)}"  # a loopback client appears as the gateway
    assert local == f"[{guest6}]:{GUEST_PORT}"
    got = client(host.ns, "get", "::1", str(port))
    assert got["reply"] == f"{host.size} {host.sha256}"
    put = client(host.ns, "put", "::1", str(port), str(host.payload))
    assert put["reply"] == f"{host.size} {host.sha256}"


def test_udp_from_host_loopback_reaches_the_guest_ipv6_address(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path, guest6 = served6
    port = port_unused_in(host)
    assert add(path, proto="udp", host_addr="::1", host_port=port,
               guest_addr=guest6) == b'{"return":{"id":1}}'
    out = client(host.ns, "udp", "::1", str(port))
    assert udp_sources(out) == {f"[{GATEWAY6}]:{port_of(out)}"}


def test_ipv6_peer_keeps_its_address_in_an_ipv6_only_guest(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str], peer6: NetNS,
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path, guest6 = served6
    guest.run(["ip", "-4", "route", "flush", "dev", TAP])
    guest.run(["ip", "-4", "addr", "flush", "dev", TAP])
    port = port_unused_in(host)
    add_tcp_and_udp(path, "::", port)
    who = client(peer6, "who", HOST6, str(port))
    seen, local = who["reply"].split()
    assert seen == who["me"] and who["me"].startswith(f"[{PEER6}]:")
    assert local == f"[{guest6}]:{GUEST_PORT}"
    got = client(peer6, "get", HOST6, str(port))
    assert got["reply"] == f"{host.size} {host.sha256}"
    out = client(peer6, "udp", HOST6, str(port))
    assert udp_sources(out) == {out["me"]}


def test_dual_stack_forward_sends_ipv4_clients_to_the_guest_ipv4_address(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path, guest6 = served6
    port = port_unused_in(host)
    add_tcp_and_udp(path, "::", port)
    v4 = client(host.ns, "who", "127.0.0.1", str(port))
    assert v4["reply"] == f"10.0.2.2:{port_of(v4)} 10.0.2.100:{GUEST_PORT}"
    v6 = client(host.ns, "who", "::1", str(port))
    assert v6["reply"] == f"[{GATEWAY6}]:{port_of(v6)} [{guest6}]:{GUEST_PORT}"
    udp4 = client(host.ns, "udp", "127.0.0.1", str(port))
    assert udp_sources(udp4) == {f"10.0.2.2:{port_of(udp4)}"}
    udp6 = client(host.ns, "udp", "::1", str(port))
    assert udp_sources(udp6) == {f"[{GATEWAY6}]:{port_of(udp6)}"}


def test_an_ipv6_host_address_to_an_ipv4_guest_address_as_rootlesskit_asks(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    """rootlesskit's slirp4netns driver sends ``-p [::1]:P:Q`` with the child's IPv4 address."""
    _slirp, path, _guest6 = served6
    port = port_unused_in(host)
    assert add(path, proto="tcp", host_addr="::1", host_port=port,
               guest_addr="10.0.2.100") == b'{"return":{"id":1}}'
    who = client(host.ns, "who", "::1", str(port))
    assert who["reply"] == f"10.0.2.2:{port_of(who)} 10.0.2.100:{GUEST_PORT}"


def test_an_ipv4_forward_and_an_ipv6_one_share_a_port(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    """0.0.0.0 first, then ``::`` (as docker asks): the IPv6 one takes IPv6 clients only."""
    _slirp, path, guest6 = served6
    port = port_unused_in(host)
    assert add(path, proto="tcp", host_port=port) == b'{"return":{"id":1}}'
    assert add(path, proto="tcp", host_addr="::", host_port=port) == b'{"return":{"id":2}}'
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].endswith(
        f" 10.0.2.100:{GUEST_PORT}")
    assert client(host.ns, "who", "::1", str(port))["reply"].endswith(
        f" [{guest6}]:{GUEST_PORT}")
    # Removing the IPv6 one leaves the IPv4 one serving.
    assert api(path, {"execute": "remove_hostfwd", "arguments": {"id": 2}}) == b'{"return":{}}'
    assert host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.count("LISTEN") == 1
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith("10.0.2.2:")


def test_remove_hostfwd_closes_ipv6_ports(
        host: Host, guest: Guest, served6: tuple[Slirp, Path, str],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path, _guest6 = served6
    port = port_unused_in(host)
    add_tcp_and_udp(path, "::1", port)
    assert client(host.ns, "udp", "::1", str(port))["replies"][0][1]
    for fwd_id in (1, 2):
        assert api(path, {"execute": "remove_hostfwd", "arguments": {"id": fwd_id}}) == \
            b'{"return":{}}'
    assert host.run(["ss", "-Htuln", f"sport = :{port}"]).stdout.strip() == ""
    assert listing(path) == []


# ---- refusals ------------------------------------------------------------------------------

def _bad(field: str, why: str = "") -> bytes:
    return b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.%s%s"}}' % (
        field.encode(), why.encode())


def test_ipv6_requests_without_ipv6_are_refused_saying_why(
        host: Host, start_slirp: StartSlirp, tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    start_slirp("--api-socket", str(path))
    port = port_unused_in(host)
    no_ipv6 = ": IPv6 is not enabled (--enable-ipv6)"
    assert add(path, proto="tcp", host_addr="::1", host_port=port) == _bad("host_addr", no_ipv6)
    assert add(path, proto="udp", host_port=port, guest_addr="fd00::100") == \
        _bad("guest_addr", no_ipv6)
    assert host.run(["ss", "-Htuln", f"sport = :{port}"]).stdout.strip() == ""


def test_bad_ipv6_requests_are_refused_saying_why(
        host: Host, served6: tuple[Slirp, Path, str]) -> None:
    _slirp, path, _guest6 = served6
    port = port_unused_in(host)
    assert add(path, proto="tcp", host_addr="::1::2", host_port=port) == _bad("host_addr")
    assert add(path, proto="tcp", host_addr="::1", host_port=port, guest_addr="fd01::100") == \
        _bad("guest_addr", ": fd01::100 is outside the guest's prefix fd00::/64")
    assert add(path, proto="tcp", host_addr="::1", host_port=port, guest_addr="fd00::2") == \
        _bad("guest_addr", ": fd00::2 is pyslirp's own address, not the guest's")
    # An address this host does not have: the bind fails, as for IPv4.
    assert add(path, proto="tcp", host_addr="2001:db8:ffff::1", host_port=port) == (
        b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}')
    assert listing(path) == []
