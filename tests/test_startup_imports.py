"""The start path imports only what it needs before the TAP exists and the ready byte.

podman waits for both (pyslirp.cli, "Start-up order"), so every module imported
before them costs every container start. A real ``pyslirp`` is started against a
fresh network namespace through a small wrapper that notes the modules imported
since the interpreter started (``sys.modules`` less what ``site`` loaded) at the
fork that opens the TAP (the ``os.fork`` audit event) and at the write of the
ready byte (the wrapper's ``os.write``); both sets must lie within
tests/startup_imports.json. A module new on the start path fails here: import it
after the TAP and the ready byte, or, if it is really needed there, add it to
the budget and say in the commit what it costs (``python -X importtime``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BUDGET = json.loads((Path(__file__).parent / "startup_imports.json").read_text())

WRAPPER = textwrap.dedent('''
    import os, sys
    base = set(sys.modules)
    # Opened now: after --enable-sandbox the path is gone, and nothing may be imported
    # then (the answer is a repr, read back with ast.literal_eval).
    # On a high fd: the shared mode's waiter takes 3 and 4 (fcntl is on the budget anyway).
    import fcntl
    out = open(fcntl.fcntl(os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           fcntl.F_DUPFD_CLOEXEC, 100), "w")
    ready_fd = int(sys.argv[2])
    seen = {"spawned": []}

    me = os.getpid()

    def hook(event, args):
        if os.getpid() != me:
            return  # a child forked on the way (the TAP helper, the shared engine's spawn)
        if event == "os.fork" and "tap" not in seen:
            seen["tap"] = sorted(set(sys.modules) - base)
        elif event in ("subprocess.Popen", "os.posix_spawn", "os.exec", "os.system"):
            seen["spawned"].append(str(args[0]))
            if event == "os.exec" and "ready" not in seen:
                # The shared mode's waiter (/bin/sh) writes the byte: this is its moment.
                seen["ready"] = sorted(set(sys.modules) - base)
                out.write(repr(seen))
                out.close()

    sys.addaudithook(hook)
    real_write = os.write

    def write(fd, data):
        if fd == ready_fd and "ready" not in seen:
            seen["ready"] = sorted(set(sys.modules) - base)
            out.write(repr(seen))
            out.close()
        return real_write(fd, data)

    os.write = write
    from pyslirp.cli import main
    sys.exit(main(sys.argv[3:]))
''')

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun for a real TAP")


def _imports_at_start(tmp_path: Path, *options: str,
                      env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """What pyslirp had imported at the TAP fork and at the ready byte, for ``options``."""
    target = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    ready_r, ready_w = os.pipe()
    os.set_inheritable(ready_w, True)
    out = tmp_path / "imports.json"
    proc = None
    try:
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{target.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            assert time.monotonic() < deadline, "unshare did not make a network namespace"
            time.sleep(0.01)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", WRAPPER, str(out), str(ready_w), *options,
             "-r", str(ready_w), str(target.pid), "tap0"],
            pass_fds=(ready_w,), stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        os.close(ready_w)
        ready_w = -1
        assert os.read(ready_r, 1) == b"1", proc.stderr.read() if proc.stderr else ""
        return ast.literal_eval(out.read_text())  # written before the byte
    finally:
        if proc is not None:
            proc.terminate()
            proc.communicate(timeout=30)
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        target.kill()
        target.wait()


def _over_budget(modules: list[str], stage: str) -> list[str]:
    return sorted(set(modules) - set(BUDGET[stage]))


@pytest.mark.parametrize("options", [
    ("-c",),
    ("--disable-host-loopback", "--mtu=65520", "--enable-ipv6", "-c"),
], ids=["configure", "podman-without-hardening"])
def test_tap_and_ready_come_before_the_engine(tmp_path: Path, options: tuple[str, ...]) -> None:
    seen = _imports_at_start(tmp_path, *options)
    assert _over_budget(seen["tap"], "before_tap") == []
    assert _over_budget(seen["ready"], "before_ready") == []
    assert seen["spawned"] == []  # no ldconfig -p (ctypes.util.find_library) on the way


def test_api_socket_listens_before_the_engine(tmp_path: Path) -> None:
    seen = _imports_at_start(tmp_path, "-c", f"--api-socket={tmp_path / 'api.sock'}")
    assert _over_budget(seen["tap"], "before_tap") == []
    assert _over_budget(seen["ready"], "before_ready_with_api") == []


def test_tap_comes_before_the_engine_with_podmans_hardening(tmp_path: Path) -> None:
    # The ready byte waits for the sandbox, which needs the engine loaded; the TAP does not.
    seen = _imports_at_start(tmp_path, "--disable-host-loopback", "--mtu=65520",
                             "--enable-sandbox", "--enable-seccomp", "--enable-ipv6", "-c",
                             f"--api-socket={tmp_path / 'api.sock'}")
    assert _over_budget(seen["tap"], "before_tap") == []
    assert "pyslirp.stack.stack" in seen["ready"]  # the budget test sees what it claims to
    # The engine is loaded by then, and all of it waits for the byte: nothing else may be
    # (pkgutil's walk over every module of ours once loaded the CNI engine's, pyslirp run's,
    # and with them pickle, tempfile, shutil, argparse: ~15 ms of each podman start).
    never = BUDGET["never_before_ready_hardened"]
    assert [m for m in seen["ready"] if m in never or m.startswith(
        tuple(f"{n}." for n in never))] == []
    # Nothing is spawned on the way (ctypes.util.find_library runs ldconfig -p): here the
    # whole start, engine, sandbox and seccomp included, comes before the ready byte.
    assert seen["spawned"] == []


@pytest.mark.parametrize("options", [
    ("-c",),
    ("--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
     "--enable-ipv6", "-c", "--api-socket=API"),
], ids=["configure", "podman"])
def test_the_shared_mode_hands_over_without_the_engine(tmp_path: Path,
                                                       options: tuple[str, ...]) -> None:
    # PYSLIRP_SHARED_ENGINE=1: the TAP goes to the engine and the process becomes the
    # /bin/sh waiter, which writes the byte; nothing of the engine is ever imported here,
    # podman's hardening flags included (they are the engine's).
    rundir = tmp_path / "rundir"
    env = {"PYSLIRP_SHARED_ENGINE": "1", "PYSLIRP_RUNDIR": str(rundir)}
    options = tuple(o.replace("API", str(tmp_path / "api.sock")) for o in options)
    try:
        seen = _imports_at_start(tmp_path, *options, env=env)
    finally:
        _stop_engine(rundir)
    assert _over_budget(seen["tap"], "before_tap") == []
    assert _over_budget(seen["ready"], "shared_before_waiter") == []
    assert seen["spawned"] == ["/bin/sh"]  # the waiter; the engine's spawn is a child's


def _stop_engine(rundir: Path) -> None:
    import signal
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(rundir / "dropin.sock"))
        except OSError:
            return
        pid = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)[:4],
                             sys.byteorder)
    os.kill(pid, signal.SIGTERM)


def test_the_budget_holds_no_engine() -> None:
    # The budget itself must not quietly grow the engine back onto the start path.
    for stage, modules in BUDGET.items():
        if stage.startswith(("_", "never_")):
            continue
        heavy = [m for m in modules if m.split(".")[0] in ("asyncio", "uvloop", "logging",
                                                            "dataclasses", "typing", "json")
                 or m.startswith(("pyslirp.stack", "pyslirp.runtime.main"))]
        assert heavy == [], stage
