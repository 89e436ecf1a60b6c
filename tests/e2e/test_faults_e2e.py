"""Faults on the host side, each with the outcome pyslirp defines for it.

* The host peer resets a connection mid-transfer: the guest's connection gets RST; its
  other flows carry on.
* The host peer's process is killed mid-transfer: the guest sees what the host's kernel
  made of it, RST when the peer left data unread (as with a reset), else the data sent
  so far and then EOF; other flows carry on.
* pyslirp runs out of file descriptors (``RLIMIT_NOFILE``): a new TCP flow is refused
  (RST: ``ECONNREFUSED`` in the guest), a new UDP flow's datagrams are dropped, both
  counted (``host.out_of_fds``) and logged (at most once per
  ``hostsockets.SOCKET_WARNING_INTERVAL``); flows opened before keep working, and new ones work
  again once fds are free.
* The guest namespace's last process exits: pyslirp keeps serving, as slirp4netns 1.2.0
  does (its TAP fd keeps the namespace alive, nothing on the link says it is gone);
  callers stop it with ``--exit-fd`` (test_lifecycle) or a signal.
* The TAP device is deleted inside the namespace: pyslirp logs which device went away
  and how, and exits with status 1, without a traceback (slirp4netns 1.2.0 keeps
  running and logs ``read: File descriptor in bad state`` in a busy loop).

DNS upstream faults are tests/runtime/test_dns_upstream_faults.py (real sockets, no
namespace needed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import GATEWAY, REPO, TAP, Guest, Host, StartSlirp, alive
from tests.e2e.servers import HELLO
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e

BLOCK = 256 * 1024

#: A server on the host's loopback: sends BLOCK bytes to its one client, then, per mode,
#: ``rst``: waits for one byte and resets; ``hold``: waits to be killed.
PEER = """
import socket, struct, sys, time
mode, block = sys.argv[1], int(sys.argv[2])
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
print(ls.getsockname()[1], flush=True)
conn, _ = ls.accept()
conn.sendall(bytes(range(256)) * (block // 256))
if mode == "rst":
    conn.recv(1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
time.sleep(600)
"""

#: In the guest: an echo flow opened first, then the victim flow; BLOCK bytes read from
#: the victim, an optional byte sent back ("ack"), then what the victim's end looks like,
#: and whether the echo flow still works.
VICTIM = """
import json, socket, sys
gw, port, echo_port, block, ack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5] == "ack"
echo = socket.create_connection((gw, echo_port), timeout=15)
victim = socket.create_connection((gw, port), timeout=15)
got = 0
while got < block:
    data = victim.recv(65536)
    if not data:
        break
    got += len(data)
if ack:
    victim.sendall(b"k")
print("received", got, flush=True)
try:
    end = "eof" if victim.recv(65536) == b"" else "data"
except ConnectionResetError:
    end = "reset"
except TimeoutError:
    end = "timeout"
echo.sendall(b"still here")
print(json.dumps({"got": got, "end": end, "echo": echo.recv(100).decode()}), flush=True)
"""


def _start_peer(host: Host, mode: str) -> tuple[subprocess.Popen[str], int]:
    peer = host.ns.popen([sys.executable, "-c", PEER, mode, str(BLOCK)], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    assert peer.stdout is not None
    return peer, int(peer.stdout.readline())


def _start_victim(guest: Guest, host: Host, port: int, ack: bool) -> subprocess.Popen[str]:
    return guest.popen([sys.executable, "-c", VICTIM, GATEWAY, str(port), str(host.echo),
                        str(BLOCK), "ack" if ack else "no"], stdout=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, text=True, cwd=REPO)


def _outcome(victim: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = victim.communicate(timeout=30)
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


@pytest.fixture
def peers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_host_reset_mid_transfer_resets_the_guest_and_spares_other_flows(
        host: Host, guest: Guest, start_slirp: StartSlirp,
        peers: list[subprocess.Popen[str]]) -> None:
    start_slirp()
    peer, port = _start_peer(host, "rst")
    peers.append(peer)
    victim = _start_victim(guest, host, port, ack=True)
    assert _outcome(victim) == {"got": BLOCK, "end": "reset", "echo": "still here"}


def _server_has_unread(host: Host, port: int) -> bool:
    out = host.run(["ss", "-Htn", "state", "established", f"sport = :{port}"]).stdout.split()
    return bool(out) and int(out[0]) > 0  # Recv-Q of the server's connection


@pytest.mark.parametrize(("unread", "end"), [(True, "reset"), (False, "eof")],
                         ids=["with-unread-data", "idle"])
def test_host_peer_killed_mid_transfer(host: Host, guest: Guest, start_slirp: StartSlirp,
                                       peers: list[subprocess.Popen[str]], unread: bool,
                                       end: str) -> None:
    start_slirp()
    peer, port = _start_peer(host, "hold")
    peers.append(peer)
    victim = _start_victim(guest, host, port, ack=unread)
    assert victim.stdout is not None
    assert victim.stdout.readline().split() == ["received", str(BLOCK)]
    if unread:
        wait_for(lambda: _server_has_unread(host, port), what="the guest's byte at the peer")
    peer.kill()
    assert _outcome(victim) == {"got": BLOCK, "end": end, "echo": "still here"}


# ---- out of file descriptors ----------------------------------------------------------

#: In the guest: an "old" echo flow carries half of a blob; then new connections are
#: opened and held until one is refused; a UDP datagram to the echo port goes unanswered;
#: the old flow carries the other half; the held ones are closed and new connections are
#: retried until one works again.
EXHAUST = """
import hashlib, json, os, socket, sys, time
gw, echo_port, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blob = os.urandom(1 << 20)
old = socket.create_connection((gw, echo_port), timeout=15)

def carry(part):
    old.sendall(part)
    back = b""
    while len(back) < len(part):
        back += old.recv(1 << 20)
    return back

echoed = carry(blob[:len(blob) // 2])
held, refused = [], None
for _ in range(most):
    s = socket.socket()
    s.settimeout(15)
    try:
        s.connect((gw, echo_port))
    except OSError as exc:
        refused = type(exc).__name__
        s.close()
        break
    held.append(s)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(b"udp while out of fds", (gw, echo_port))
try:
    udp = u.recv(100).decode()
except TimeoutError:
    udp = "no reply"
echoed += carry(blob[len(blob) // 2:])
for s in held:
    s.close()
deadline, again = time.monotonic() + 15, False
while not again and time.monotonic() < deadline:
    try:
        with socket.create_connection((gw, echo_port), timeout=15) as s:
            s.sendall(b"back")
            again = s.recv(4) == b"back"
    except ConnectionRefusedError:
        time.sleep(0.05)
print(json.dumps({"held": len(held), "refused": refused, "udp": udp, "again": again,
                  "intact": hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()}))
"""

FD_LIMIT = 64


def test_out_of_fds_refuses_new_flows_and_keeps_old_ones(
        host: Host, guest: Guest, start_slirp: StartSlirp,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSLIRP_E2E_COMMAND",
                       f"prlimit --nofile={FD_LIMIT} {sys.executable} -m pyslirp")
    slirp = start_slirp()
    out = guest.python(EXHAUST, GATEWAY, str(host.echo), str(FD_LIMIT * 2), timeout=90).stdout
    result = json.loads(out)
    assert result["refused"] == "ConnectionRefusedError", result
    assert 0 < result["held"] < FD_LIMIT, result
    assert result["udp"] == "no reply"
    assert result["intact"] and result["again"], result
    # pyslirp itself is fine, and the guest's link still serves.
    assert slirp.proc.poll() is None
    assert guest.run(["curl", "-sS", "--fail", "--max-time", "15",
                      host.url("/hello")]).stdout == HELLO.decode()
    assert slirp.stop() == -signal.SIGTERM
    log = slirp.log_text()
    assert "Traceback" not in log
    assert "out of file descriptors" in log
    assert "host.out_of_fds=" in log
    # Logged once for the whole episode, not once per refused flow.
    assert log.count("out of file descriptors") == 1, log


# ---- the guest namespace and its TAP ----------------------------------------------------

def _lonely_namespace() -> subprocess.Popen[bytes]:
    """A process alone in a new network namespace (no name, no bind mount)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "600"], stdin=subprocess.DEVNULL)
    wait_for(lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
             what="the process to enter its namespace")
    return proc


def test_namespace_without_processes_keeps_serving_until_stopped(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    holder = _lonely_namespace()
    try:
        lonely = Guest(ns=guest.ns, pid=holder.pid, tmp=guest.tmp)
        slirp = start_slirp(target=lonely)
        tap_fd_links = {os.readlink(f"/proc/{slirp.pid}/fd/{fd}")
                        for fd in os.listdir(f"/proc/{slirp.pid}/fd")}
        assert "/dev/net/tun" in tap_fd_links
    finally:
        holder.kill()
        holder.wait()
    # Its TAP fd keeps the namespace alive; nothing tells pyslirp that nobody is left.
    assert alive(slirp.pid)
    assert slirp.stop(signal.SIGTERM) == -signal.SIGTERM
    assert "Traceback" not in slirp.log_text()


def test_tap_deleted_exits_with_an_error_and_no_traceback(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp()
    guest.run(["ip", "link", "del", TAP])
    assert slirp.proc.wait(timeout=20) == 1
    log = slirp.log_text()
    assert f"TAP device {TAP}" in log, log
    assert "Traceback" not in log, log

