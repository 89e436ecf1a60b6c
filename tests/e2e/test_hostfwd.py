"""Port forwarding through ``--api-socket``, end to end.

pyslirp serves the guest from the session's host namespace with an API
socket; the tests add forwards the way rootlesskit and podman do (one JSON
request per connection), then reach a server inside the guest from the host's
loopback and from a *peer* namespace joined to the host by a veth with
198.18.0.0/15 addresses (a non-loopback client). The guest's server reports
the source address it saw, and hashes what it received.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, Slirp, StartSlirp
from tests.nsutil import NetNS, veth
from tests.test_api import PARSE_CASES, SESSION, read_all, session_ports, substitute

pytestmark = pytest.mark.e2e

HOST_ADDR = "198.18.0.1"
PEER_ADDR = "198.18.0.2"
GUEST_PORT = 8000
_names = itertools.count()

#: In the guest: a TCP and a UDP server on one port. TCP speaks one command line:
#: WHO (answers the client's address as seen here), GET (sends the payload file),
#: PUT (hashes everything up to EOF), ECHO (echoes lines until EOF).
#: UDP answers "ADDR:PORT " + the datagram.
GUEST_SERVER = r"""
import hashlib, socket, sys, threading
port, payload = int(sys.argv[1]), sys.argv[2]

def serve(c, peer):
    with c:
        f = c.makefile("rb")
        cmd = f.readline().strip()
        if cmd == b"WHO":
            c.sendall(f"{peer[0]}:{peer[1]}\n".encode())
        elif cmd == b"GET":
            with open(payload, "rb") as p:
                c.sendfile(p)
        elif cmd == b"PUT":
            h, n = hashlib.sha256(), 0
            while chunk := f.read1(1 << 20):
                h.update(chunk)
                n += len(chunk)
            c.sendall(f"{n} {h.hexdigest()}\n".encode())
        elif cmd == b"ECHO":
            for line in f:
                c.sendall(line)

def tcp(ls):
    while True:
        c, peer = ls.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()

def udp(us):
    while True:
        data, peer = us.recvfrom(65535)
        us.sendto(f"{peer[0]}:{peer[1]} ".encode() + data, peer)

ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("0.0.0.0", port))
ls.listen(128)
us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
us.bind(("0.0.0.0", port))
threading.Thread(target=udp, args=(us,), daemon=True).start()
print("ready", flush=True)
tcp(ls)
"""

#: On the host side (or the peer): one exchange with a forwarded port; prints JSON.
CLIENT = r"""
import hashlib, json, socket, sys
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
arg = sys.argv[4] if len(sys.argv) > 4 else ""
out = {}
if mode == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    s.connect((addr, port))
    replies = []
    for size in (5, 1400, 30000):  # the last one is fragmented on the guest's link
        data = bytes((i * 7 + size) & 0xFF for i in range(size))
        for _ in range(5):  # UDP: the first datagram may wait for ARP; retry a lost one
            s.send(data)
            try:
                reply = s.recv(65535)
                break
            except TimeoutError:
                continue
        seen, _, echoed = reply.partition(b" ")
        replies.append([size, echoed == data, seen.decode()])
    out = {"me": "%s:%d" % s.getsockname(), "replies": replies}
else:
    s = socket.create_connection((addr, port), timeout=120)
    out["me"] = "%s:%d" % s.getsockname()
    if mode == "who":
        s.sendall(b"WHO\n")
    elif mode == "get":
        s.sendall(b"GET\n")
    elif mode == "put":
        s.sendall(b"PUT\n")
        with open(arg, "rb") as f:
            s.sendfile(f)
    s.shutdown(socket.SHUT_WR)
    h, n = hashlib.sha256(), 0
    data = b""
    while chunk := s.recv(1 << 20):
        if mode == "get":
            h.update(chunk)
            n += len(chunk)
        else:
            data += chunk
    out["reply"] = f"{n} {h.hexdigest()}" if mode == "get" else data.decode().strip()
print(json.dumps(out))
"""

CONNECT = r"""
import errno, socket, sys
s = socket.socket()
s.settimeout(20)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"WHO\n")
    print("data:" + s.recv(100).decode().strip())
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc.errno)))
"""


def api(path: Path, request: dict[str, Any] | bytes) -> bytes:
    data = request if isinstance(request, bytes) else json.dumps(request).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def add_fwd(path: Path, proto: str, host_port: int, host_addr: str | None = None,
            guest_port: int = GUEST_PORT) -> int:
    args: dict[str, Any] = {"proto": proto, "host_port": host_port, "guest_port": guest_port}
    if host_addr is not None:
        args["host_addr"] = host_addr
    reply = json.loads(api(path, {"execute": "add_hostfwd", "arguments": args}))
    assert "return" in reply, reply
    fwd_id: int = reply["return"]["id"]
    return fwd_id


def port_unused_in(host: Host, kind: str = "-tu") -> int:
    """A port nothing in the host namespace uses (TCP or UDP), in any state.

    Below the ephemeral range (32768..60999), so that no connection's local port can
    take it between this check and the bind (callers use up to base + 110).
    """
    used = host.run(["ss", "-Han" + kind.lstrip("-")]).stdout
    for port in itertools.count(20000 + os.getpid() % 1000 * 12):
        if f":{port} " not in used:
            return port
    raise AssertionError


def replay_api_tables(path: Path, host: Host) -> None:
    """tests/test_api.py's requests to the API socket at ``path``: each reply must be
    the one recorded from slirp4netns, byte for byte."""
    for raw, expected in PARSE_CASES:
        assert api(path, raw) == expected, raw
    base = port_unused_in(host) + 100
    ports = session_ports(base)
    for request, reply in SESSION:
        assert api(path, substitute(request, ports)) == substitute(reply, ports), request


@pytest.fixture
def fwd_slirp(start_slirp: StartSlirp, tmp_path: Path) -> tuple[Slirp, Path]:
    path = tmp_path / "api.sock"
    return start_slirp("--api-socket", str(path)), path


def start_guest_server(host: Host, guest: Guest,
                       script: str = GUEST_SERVER) -> subprocess.Popen[bytes]:
    """``script`` (a GUEST_SERVER) in the guest on GUEST_PORT with the host's payload file,
    once it says it is ready."""
    proc = guest.popen([sys.executable, "-c", script, str(GUEST_PORT), str(host.payload)],
                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    return proc


@pytest.fixture
def guest_server(host: Host, guest: Guest) -> subprocess.Popen[bytes]:
    return start_guest_server(host, guest)


@pytest.fixture
def peer(host: Host) -> Iterator[NetNS]:
    """A namespace joined to the host namespace by a veth: 198.18.0.2 -> 198.18.0.1."""
    n = next(_names)
    with NetNS("peer") as ns:
        veth(host.ns, f"pfh{os.getpid() % 10000}x{n}", ns, "eth0", f"{HOST_ADDR}/24",
             f"{PEER_ADDR}/24")
        yield ns


def client(ns: Any, *args: str, timeout: float = 300) -> dict[str, Any]:
    out = ns.run([sys.executable, "-c", CLIENT, *args], timeout=timeout).stdout
    result: dict[str, Any] = json.loads(out)
    return result


# ---- the API socket of a running pyslirp -----------------------------------------------

def test_api_socket_is_owner_only_and_removed_on_exit(fwd_slirp: tuple[Slirp, Path]) -> None:
    slirp, path = fwd_slirp
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert api(path, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
    assert slirp.stop() == -signal.SIGTERM
    assert not path.exists()


def test_api_tables_byte_for_byte(fwd_slirp: tuple[Slirp, Path], host: Host) -> None:
    """The replies recorded from slirp4netns 1.2.0, from pyslirp with real sockets."""
    _slirp, path = fwd_slirp
    replay_api_tables(path, host)


def test_port_in_use_and_crashing_requests(fwd_slirp: tuple[Slirp, Path], host: Host) -> None:
    slirp, path = fwd_slirp
    port = port_unused_in(host)
    with host.ns.popen([sys.executable, "-c", (
            "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
            "s.listen(); print('ready', flush=True); time.sleep(600)"), str(port)],
            stdout=subprocess.PIPE) as blocker:
        assert blocker.stdout is not None and blocker.stdout.readline() == b"ready\n"
        reply = api(path, {"execute": "add_hostfwd",
                           "arguments": {"proto": "tcp", "host_port": port, "guest_port": 80}})
        assert reply == b'{"error":{"desc":"bad request: add_hostfwd: slirp_add_hostfwd failed"}}'
        blocker.kill()
    # slirp4netns dies on these (NULL proto); pyslirp answers and keeps serving.
    for request in (b'{"execute":"add_hostfwd"}',
                    b'{"execute":"add_hostfwd","arguments":{"host_port":1,"guest_port":1}}'):
        assert api(path, request) == (
            b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.proto"}}')
    assert add_fwd(path, "tcp", port) == 1  # the port is free now; ids start at 1
    assert slirp.proc.poll() is None


# ---- TCP -----------------------------------------------------------------------------------

def test_tcp_from_loopback_appears_as_the_gateway_and_carries_100mb(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    add_fwd(path, "tcp", port, host_addr="127.0.0.1")
    who = client(host.ns, "who", "127.0.0.1", str(port))
    seen_ip, seen_port = who["reply"].split(":")
    assert seen_ip == GATEWAY
    assert seen_port == who["me"].split(":")[1]  # the client's own port
    got = client(host.ns, "get", "127.0.0.1", str(port))
    assert got["reply"] == f"{host.size} {host.sha256}"
    put = client(host.ns, "put", "127.0.0.1", str(port), str(host.payload))
    assert put["reply"] == f"{host.size} {host.sha256}"


def test_tcp_from_a_non_loopback_peer_keeps_its_address_and_carries_100mb(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path], peer: NetNS,
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    add_fwd(path, "tcp", port)  # host_addr defaults to 0.0.0.0
    who = client(peer, "who", HOST_ADDR, str(port))
    assert who["reply"] == who["me"]  # 198.18.0.2:its port, as the peer itself sees it
    assert who["me"].startswith(PEER_ADDR + ":")
    got = client(peer, "get", HOST_ADDR, str(port))
    assert got["reply"] == f"{host.size} {host.sha256}"
    put = client(peer, "put", HOST_ADDR, str(port), str(host.payload))
    assert put["reply"] == f"{host.size} {host.sha256}"
    # Through the loopback forward as well as 0.0.0.0 binds it.
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith(GATEWAY + ":")


def test_many_concurrent_forwarded_connections(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    add_fwd(path, "tcp", port, host_addr="127.0.0.1")
    code = r"""
import socket, sys, threading
port, n = int(sys.argv[1]), int(sys.argv[2])
ok = []
def one(i):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"ECHO\n")
    msg = f"line {i}\n".encode() * 100
    s.sendall(msg)
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    ok.append(data == msg)
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print(sum(ok))
"""
    out = host.run([sys.executable, "-c", code, str(port), "100"], timeout=120).stdout
    assert out.strip() == "100"


def test_guest_not_listening_resets_the_host_client(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    add_fwd(path, "tcp", port, host_addr="127.0.0.1", guest_port=GUEST_PORT + 1)
    # The kernel accepts on the host side first; the guest's RST then resets it.
    result = host.run([sys.executable, "-c", CONNECT, "127.0.0.1", str(port)]).stdout.strip()
    assert result in ("ECONNRESET", "EPIPE"), result


def test_remove_hostfwd_closes_the_port_and_keeps_open_connections(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path],
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    tcp_id = add_fwd(path, "tcp", port, host_addr="127.0.0.1")
    udp_id = add_fwd(path, "udp", port, host_addr="127.0.0.1")
    assert host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip()
    # A connection made before the removal ...
    code = r"""
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(b"ECHO\nbefore\n")
print(s.recv(100).decode().strip(), flush=True)
sys.stdin.readline()
s.sendall(b"after\n")
print(s.recv(100).decode().strip(), flush=True)
"""
    with host.ns.popen([sys.executable, "-c", code, str(port)], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True) as held:
        assert held.stdout is not None and held.stdin is not None
        assert held.stdout.readline().strip() == "before"
        assert api(path, {"execute": "remove_hostfwd", "arguments": {"id": tcp_id}}) == \
            b'{"return":{}}'
        assert api(path, {"execute": "remove_hostfwd", "arguments": {"id": udp_id}}) == \
            b'{"return":{}}'
        # ... goes on, while the port itself is closed for TCP and UDP.
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "after"
    assert host.run(["ss", "-Hltn", f"sport = :{port}"]).stdout.strip() == ""
    assert host.run(["ss", "-Hlun", f"sport = :{port}"]).stdout.strip() == ""
    refused = host.run([sys.executable, "-c", CONNECT, "127.0.0.1", str(port)]).stdout.strip()
    assert refused == "ECONNREFUSED"
    assert api(path, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'
    # The same port can be forwarded again, under a new id.
    assert add_fwd(path, "tcp", port, host_addr="127.0.0.1") == 3
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith(GATEWAY + ":")


# ---- UDP -----------------------------------------------------------------------------------

def test_udp_from_loopback_and_from_a_peer(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path], peer: NetNS,
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    add_fwd(path, "udp", port)
    local = client(host.ns, "udp", "127.0.0.1", str(port))
    for size, same, seen in local["replies"]:
        assert same, size
        assert seen == f"{GATEWAY}:{local['me'].split(':')[1]}"
    remote = client(peer, "udp", HOST_ADDR, str(port))
    for size, same, seen in remote["replies"]:
        assert same, size
        assert seen == remote["me"]


def test_udp_port_removed_is_closed(host: Host, guest: Guest,
                                    fwd_slirp: tuple[Slirp, Path],
                                    guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    port = port_unused_in(host)
    fwd_id = add_fwd(path, "udp", port, host_addr="127.0.0.1")
    assert client(host.ns, "udp", "127.0.0.1", str(port))["replies"][0][1]
    api(path, {"execute": "remove_hostfwd", "arguments": {"id": fwd_id}})
    code = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.connect(("127.0.0.1", int(sys.argv[1])))
s.send(b"x")
try:
    s.recv(100)
    print("answered")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)))
"""
    out = host.run([sys.executable, "-c", code, str(port)]).stdout.strip()
    assert out == "ECONNREFUSED"  # ICMP port unreachable: nobody has the port any more



# ---- host port 0: the kernel picks (pyslirp's extension) -------------------------------------

@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_host_port_0_forwards_the_port_the_answer_names(
        host: Host, guest: Guest, fwd_slirp: tuple[Slirp, Path], proto: str,
        guest_server: subprocess.Popen[bytes]) -> None:
    _slirp, path = fwd_slirp
    request = {"execute": "add_hostfwd", "arguments": {
        "proto": proto, "host_addr": "127.0.0.1", "host_port": 0, "guest_port": GUEST_PORT}}
    reply = json.loads(api(path, request))
    port = reply["return"]["host_port"]
    assert reply == {"return": {"id": 1, "host_port": port}} and 0 < port < 65536
    assert json.loads(api(path, b'{"execute":"list_hostfwd"}')) == {"entries": [{
        "id": 1, "proto": proto, "host_addr": "127.0.0.1", "host_port": port,
        "guest_addr": "10.0.2.100", "guest_port": GUEST_PORT}]}
    if proto == "tcp":
        assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith(GATEWAY + ":")
    else:
        replies = client(host.ns, "udp", "127.0.0.1", str(port))["replies"]
        assert all(same for _size, same, _seen in replies), replies
    # A second one gets another port; a fixed port keeps slirp4netns's answer.
    again = json.loads(api(path, request))["return"]
    assert again["id"] == 2 and again["host_port"] != port
    fixed = port_unused_in(host)
    assert api(path, {"execute": "add_hostfwd", "arguments": {
        "proto": proto, "host_port": fixed, "guest_port": GUEST_PORT}}) == b'{"return":{"id":3}}'
    # Removed, it is closed like any forward.
    assert api(path, {"execute": "remove_hostfwd", "arguments": {"id": 1}}) == b'{"return":{}}'
    listening = host.run(["ss", "-Hln" + proto[0], f"sport = :{port}"]).stdout
    assert listening.strip() == ""


# ---- other configurations --------------------------------------------------------------------

def test_loopback_forwards_work_with_disable_host_loopback(
        host: Host, guest: Guest, start_slirp: StartSlirp, tmp_path: Path,
        guest_server: subprocess.Popen[bytes]) -> None:
    """rootlesskit forwards from 127.0.0.1 even when the guest may not reach the host's lo."""
    path = tmp_path / "api.sock"
    start_slirp("--disable-host-loopback", "--api-socket", str(path))
    port = port_unused_in(host)
    add_fwd(path, "tcp", port, host_addr="127.0.0.1")
    add_fwd(path, "udp", port, host_addr="127.0.0.1")
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith(GATEWAY + ":")
    udp = client(host.ns, "udp", "127.0.0.1", str(port))
    assert all(same for _size, same, _seen in udp["replies"])
    # The guest itself still cannot reach the host's loopback through the gateway.
    out = guest.python(CONNECT, GATEWAY, str(host.echo)).stdout.strip()
    assert out in ("ENETUNREACH", "EHOSTUNREACH", "timeout"), out


def test_default_guest_addr_follows_cidr(host: Host, guest: Guest, start_slirp: StartSlirp,
                                         tmp_path: Path,
                                         guest_server: subprocess.Popen[bytes]) -> None:
    path = tmp_path / "api.sock"
    start_slirp("--cidr=10.0.3.0/24", "--api-socket", str(path))
    port = port_unused_in(host)
    add_fwd(path, "tcp", port, host_addr="127.0.0.1")
    listing = json.loads(api(path, b'{"execute":"list_hostfwd"}'))
    assert listing["entries"][0]["guest_addr"] == "10.0.3.100"
    assert client(host.ns, "who", "127.0.0.1", str(port))["reply"].startswith("10.0.3.2:")


def test_unusable_api_socket_path_fails_clearly(host: Host, guest: Guest, tmp_path: Path) -> None:
    from tests.e2e.conftest import pyslirp_argv

    regular = tmp_path / "precious"
    regular.write_text("keep me")
    for path, why in ((regular, "exists and is not a socket"),
                      (tmp_path / "missing" / "api.sock", "No such file or directory")):
        proc = host.run(pyslirp_argv("-c", "--api-socket", str(path), str(guest.pid), "tap0"),
                        check=False, timeout=60)
        assert proc.returncode == 1
        assert f"api socket {path}: {why}" in proc.stderr
    assert regular.read_text() == "keep me"
