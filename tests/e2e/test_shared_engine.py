"""The drop-in's shared mode (PYSLIRP_SHARED_ENGINE=1): one engine, many namespaces.

Each ``pyslirp PID tap0`` hands its TAP to the engine of the runtime directory and
stays as a small waiter; the engine serves every namespace as the one-process mode
would (pyslirp.cni.shared_shim, pyslirp.cni.shared_engine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DNS, GATEWAY, TAP, Guest, Host, StartSlirp, alive, pyslirp_argv
from tests.e2e.recorded import shared_engine_pid as engine_pid
from tests.e2e.recorded import stop_shared_engine
from tests.e2e.servers import HELLO, TEST_ADDR
from tests.e2e.test_hostfwd import api, port_unused_in
from tests.e2e.test_lifecycle import _stop_status
from tests.nsutil import NetNS, wait_for

pytestmark = pytest.mark.e2e

#: Answers every TCP connection on the port with the tag, then closes.
TAG_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()
"""
GUEST_PORT = 8080


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A runtime directory for the test's engine, in a parent others may traverse (the
    uid tests play another user; pytest's tmp_path is under root's 0700 directory)."""
    parent = Path(tempfile.mkdtemp(prefix="pyslirp-se-", dir="/tmp"))
    parent.chmod(0o711)
    path = parent / "rundir"
    try:
        yield path
    finally:
        stop_shared_engine(path)
        log = path / "engine.log"
        if log.exists():
            print(f"--- engine.log\n{log.read_text(errors='replace')}")
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def second_guest(host: Host, tmp_path: Path) -> Iterator[Guest]:
    from tests.e2e.conftest import _holder

    with NetNS("guest2") as ns:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield Guest(ns=ns, pid=_holder(ns), tmp=tmp_path)


def shared_env(rundir: Path) -> dict[str, str]:
    return {"PYSLIRP_SHARED_ENGINE": "1", "PYSLIRP_RUNDIR": str(rundir)}


def _hello(guest: Guest, host: Host, gateway: str = GATEWAY) -> str:
    return guest.run(["curl", "-sS", "--fail", "--max-time", "30",
                      host.url("/hello", gateway)]).stdout


def _dig(guest: Guest, dns: str, name: str) -> str:
    return guest.run(["dig", "+short", "+tries=1", "+time=10", f"@{dns}", name, "A"]).stdout.strip()


def _tag_server(guest: Guest, tag: str) -> subprocess.Popen[bytes]:
    proc = guest.popen([sys.executable, "-c", TAG_SERVER, str(GUEST_PORT), tag],
                       stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def _fetch(host: Host, port: int) -> str:
    code = ("import socket, sys\n"
            "with socket.create_connection(('127.0.0.1', int(sys.argv[1])), 10) as c:\n"
            "    c.settimeout(10); print(c.recv(100).decode())\n")
    return host.run([sys.executable, "-c", code, str(port)]).stdout.strip()


def _shims_of(rundir: Path) -> int:
    """How many drop-in attachments the engine's log says it serves now."""
    lines = [ln for ln in (rundir / "engine.log").read_text().splitlines() if "drop-in" in ln]
    return len([ln for ln in lines if " served " in ln]) - len([ln for ln in lines
                                                                 if " ends: " in ln])


def test_one_engine_serves_two_namespaces_each_as_its_own(
        host: Host, guest: Guest, second_guest: Guest, start_slirp: StartSlirp,
        rundir: Path, tmp_path: Path) -> None:
    api_a, api_b = tmp_path / "a.sock", tmp_path / "b.sock"
    a = start_slirp("--api-socket", str(api_a), env=shared_env(rundir))
    b = start_slirp("--api-socket", str(api_b), "--cidr", "10.0.3.0/24",
                    env=shared_env(rundir), target=second_guest)
    pid = engine_pid(rundir)
    assert pid is not None and pid not in (a.pid, b.pid)
    # The callers' processes are the small waiters, not interpreters.
    for shim in (a, b):
        assert Path(f"/proc/{shim.pid}/exe").resolve().name in ("dash", "sh", "bash")
    # Each reaches the host through its own gateway, and its own DNS address.
    assert _hello(guest, host) == HELLO.decode()
    assert _hello(second_guest, host, "10.0.3.2") == HELLO.decode()
    assert _dig(guest, DNS, "a.test.pyslirp.") == TEST_ADDR
    assert _dig(second_guest, "10.0.3.3", "b.test.pyslirp.") == TEST_ADDR
    assert second_guest.link(TAP)["addr_info"][0]["local"] == "10.0.3.100"  # type: ignore[index]
    # Port forwards per namespace, through each one's API socket.
    servers = [_tag_server(guest, "from-a"), _tag_server(second_guest, "from-b")]
    try:
        port_a = port_unused_in(host, "-t")
        port_b = port_a + 1
        for path, port in ((api_a, port_a), (api_b, port_b)):
            reply = json.loads(api(path, {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": port,
                "guest_port": GUEST_PORT}}))
            assert reply == {"return": {"id": 1}}
        assert _fetch(host, port_a) == "from-a"
        assert _fetch(host, port_b) == "from-b"
        listed = json.loads(api(api_b, {"execute": "list_hostfwd"}))["entries"]
        assert [e["host_port"] for e in listed] == [port_b]
        # SIGTERM on one caller removes its attachment only: its port, socket and TAP.
        assert a.stop() == -signal.SIGTERM  # as slirp4netns: dies by it, after the teardown
        assert not api_a.exists()
        assert guest.link(TAP) is None
        assert host.run(["ss", "-Htln", f"sport = :{port_a}"]).stdout.strip() == ""
        assert _fetch(host, port_b) == "from-b"
        assert _hello(second_guest, host, "10.0.3.2") == HELLO.decode()
        assert engine_pid(rundir) == pid
        assert json.loads(api(api_b, {"execute": "remove_hostfwd", "arguments": {"id": 1}})) \
            == {"return": {}}
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
    assert b.stop() == -signal.SIGTERM
    assert second_guest.link(TAP) is None


def test_the_engine_dying_ends_every_caller_with_an_error(
        host: Host, guest: Guest, second_guest: Guest, start_slirp: StartSlirp,
        rundir: Path) -> None:
    shims = [start_slirp(env=shared_env(rundir)),
             start_slirp(env=shared_env(rundir), target=second_guest)]
    pid = engine_pid(rundir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for shim in shims:
        shim.proc.wait(timeout=20)
        assert shim.proc.returncode == 1
        assert "the shared engine (pid " in shim.log_text() and "is gone" in shim.log_text()
    assert guest.link(TAP) is None and second_guest.link(TAP) is None


def test_exit_fd_and_sigkill_end_the_attachment(host: Host, guest: Guest,
                                                 second_guest: Guest, start_slirp: StartSlirp,
                                                 rundir: Path) -> None:
    read_fd, write_fd = os.pipe()
    by_fd = start_slirp(f"--exit-fd={read_fd}", env=shared_env(rundir), pass_fds=(read_fd,))
    os.close(read_fd)
    killed = start_slirp(env=shared_env(rundir), target=second_guest)
    os.close(write_fd)  # slirp4netns's -e: the fd's EOF ends it, with status 0
    assert by_fd.proc.wait(timeout=20) == 0
    wait_for(lambda: guest.link(TAP) is None, what="the TAP to go with the exit fd")
    killed.proc.kill()
    killed.proc.wait()
    wait_for(lambda: second_guest.link(TAP) is None, what="a killed caller's TAP to go")
    # With nothing left to serve the engine leaves (PYSLIRP_CNI_IDLE_EXIT, 1 s).
    wait_for(lambda: engine_pid(rundir) is None, timeout=20, what="the idle engine to exit")


def test_a_bad_value_of_the_switch_is_an_error(host: Host, guest: Guest, rundir: Path) -> None:
    from tests.e2e.conftest import pyslirp_argv

    proc = host.ns.popen(pyslirp_argv("-c", str(guest.pid), TAP), stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYSLIRP_SHARED_ENGINE": "yes",
                              "PYSLIRP_RUNDIR": str(rundir)})
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "PYSLIRP_SHARED_ENGINE must be 1" in err
    assert guest.link(TAP) is None and alive(guest.pid)


def test_a_bad_attachment_is_refused_with_the_reason(host: Host, guest: Guest,
                                                      start_slirp: StartSlirp,
                                                      rundir: Path, tmp_path: Path) -> None:
    # A pcap file the engine cannot write: the caller fails as the one-process mode does.
    with pytest.raises(pytest.fail.Exception,
                       match=r"pyslirp: ERROR: .*/missing/x.pcap: No such file or directory"):
        start_slirp(f"--pcap={tmp_path / 'missing' / 'x.pcap'}", env=shared_env(rundir))
    wait_for(lambda: guest.link(TAP) is None, what="the refused attachment's TAP to go")


def test_callers_stopped_right_after_ready_one_after_another(
        host: Host, guest: Guest, start_slirp: StartSlirp, rundir: Path) -> None:
    # Each SIGTERM right after the ready byte, on an engine kept up between them: the
    # engine's fds are reused, and every stop must still be answered at once.
    env = {**shared_env(rundir), "PYSLIRP_CNI_IDLE_EXIT": "60"}
    for _ in range(6):
        assert start_slirp(env=env).stop(timeout=10) == -signal.SIGTERM
        wait_for(lambda: guest.link(TAP) is None, what="the stopped caller's TAP to go")


def _unused_uid() -> int:
    import pwd

    used = {p.pw_uid for p in pwd.getpwall()}
    return next(uid for uid in range(61000, 65000) if uid not in used)


def _as_uid(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


ATTACKER_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op": "attach"}\n')
print(s.recv(65536).decode())
"""


def test_the_engine_refuses_drop_in_clients_of_another_uid(
        host: Host, guest: Guest, start_slirp: StartSlirp, rundir: Path) -> None:
    shim = start_slirp(env=shared_env(rundir))
    sock = rundir / "dropin.sock"
    assert sock.stat().st_mode & 0o077 == 0 and rundir.stat().st_mode & 0o777 == 0o700
    attacker = _unused_uid()
    # Pretend the permissions let the attacker reach the socket: the engine must say no.
    os.chmod(rundir, 0o711)
    os.chmod(sock, 0o666)
    try:
        proc = subprocess.run([*_as_uid(attacker), sys.executable, "-c", ATTACKER_CLIENT,
                               str(sock)], capture_output=True, text=True, timeout=60, cwd="/")
    finally:
        os.chmod(rundir, 0o700)
        os.chmod(sock, 0o600)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["ok"] is False
    assert f"refused a client of dropin.sock running as uid {attacker}" in reply["msg"]
    assert _hello(guest, host) == HELLO.decode()  # the served namespace is untouched
    assert shim.stop() == -signal.SIGTERM


FAKE_ENGINE = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b'{"ok": true}\n')
"""


def test_a_drop_in_socket_of_another_uid_is_refused(host: Host, guest: Guest,
                                                    rundir: Path) -> None:
    from tests.e2e.conftest import pyslirp_argv

    attacker = _unused_uid()
    rundir.mkdir(mode=0o700)
    (rundir / "attachments").mkdir(mode=0o700)
    # Where the attacker can bind (pytest's tmp_path is under root's 0700 directory).
    planted = Path(tempfile.mkdtemp(prefix="pyslirp-planted-", dir="/tmp"))
    os.chown(planted, attacker, attacker)
    fake = subprocess.Popen([*_as_uid(attacker), sys.executable, "-c", FAKE_ENGINE,
                             str(planted / "s")], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        os.rename(planted / "s", rundir / "dropin.sock")  # its listener's credentials stay
        proc = host.ns.popen(pyslirp_argv("-c", str(guest.pid), TAP), stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, env={**os.environ,
                                                                       **shared_env(rundir)})
        _out, err = proc.communicate(timeout=60)
    finally:
        fake.kill()
        fake.wait()
        shutil.rmtree(planted, ignore_errors=True)
    assert proc.returncode == 1
    assert f"refusing the engine on {rundir / 'dropin.sock'}: it runs as uid {attacker}" in err
    wait_for(lambda: guest.link(TAP) is None, what="the refused TAP to go")


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit-fd"])
def test_stop_status_is_the_one_process_mode_s(host: Host, guest: Guest, rundir: Path,
                                               how: str) -> None:
    # The same status as slirp4netns and the one-process mode (test_lifecycle.py's
    # test_stop_status_is_slirp4netns_s): death by the signal after the teardown; 0 by -e.
    expected = 0 if how == "exit-fd" else -getattr(signal, how)
    assert _stop_status(host, guest, pyslirp_argv(), how, env=shared_env(rundir)) == expected
    wait_for(lambda: guest.link(TAP) is None, what="the stopped caller's TAP to go")
