"""What the tests of callers that start ``slirp4netns`` themselves share (rootlesskit,
podman): pyslirp's shim behind an argument recorder, waiting for the caller's command
inside to come up, and a look at the stack process the caller started."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyslirp.runtime import sandbox
from tests.e2e.conftest import REPO, alive

#: How the shim serves: a process per namespace, or the shared engine (its runtime dir).
MODES = ("process", "shared")


def install_recorded_shim(work: Path, shared_rundir: Path | None = None) -> Path:
    """``pyslirp shim install`` into ``work/shim``, behind ``work/slirp4netns``: a script
    that appends ``PID ARGS...`` to ``work/argv.log`` and execs the shim, so PID is the
    stack's. Returns the recorder, the path to give the caller as slirp4netns.
    ``shared_rundir``: install it with ``--shared-engine --rundir shared_rundir``."""
    shim_dir = work / "shim"
    shim_dir.mkdir()
    shared = ["--shared-engine", "--rundir", str(shared_rundir)] if shared_rundir else []
    proc = subprocess.run([sys.executable, "-m", "pyslirp", "shim", "install", *shared,
                           str(shim_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    installed = Path(proc.stdout.strip())
    assert installed == shim_dir / "slirp4netns" and os.access(installed, os.X_OK)
    recorder = work / "slirp4netns"
    recorder.write_text("#!/bin/sh\n"
                        f"printf '%s\\n' \"$$ $*\" >> {shlex.quote(str(work / 'argv.log'))}\n"
                        f"exec {shlex.quote(str(installed))} \"$@\"\n")
    recorder.chmod(0o755)
    return recorder


def wait_until_ready(out: Path, proc: subprocess.Popen[str] | subprocess.Popen[bytes],
                     timeout: float, what: str, details: Callable[[], str]) -> None:
    """Wait for the command inside to write "ready" to ``out``; fail with ``details()``
    (which may stop the caller to collect its output) if the caller exits or time runs out."""
    deadline = time.monotonic() + timeout
    while "ready" not in (out.read_text() if out.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} never got ready (status {proc.poll()}):\n{details()}")
        time.sleep(0.05)


def fetch_published_port(host: Any, port: int, addr: str = "127.0.0.1") -> str:
    """GET /index.html from the host's published ``addr:port`` until it answers (the caller
    adds the forward some time after the container is ready); the body, or "" if it never
    did."""
    body = ""
    where = f"[{addr}]" if ":" in addr else addr
    for _ in range(100):
        r = host.run(["curl", "-sS", "-g", "--max-time", "10",
                      f"http://{where}:{port}/index.html"], check=False)
        body = r.stdout
        if r.returncode == 0:
            break
        time.sleep(0.1)
    return body


def shared_engine_pid(rundir: Path) -> int | None:
    """The pid of the shared engine listening in ``rundir`` (SO_PEERCRED), or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(rundir / "dropin.sock"))
        except OSError:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[:4], sys.byteorder)


def stop_shared_engine(rundir: Path) -> None:
    """Kill the engine of ``rundir`` (a test's own), if one runs."""
    pid = shared_engine_pid(rundir)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class ServedStack:
    pid: int
    args: list[str]
    #: Every call the recorder saw, ``--help`` probes included (arguments only).
    calls: list[list[str]]
    #: The capabilities and seccomp mode of the process whose stack serves: the
    #: caller's child, or in the shared mode the engine.
    caps: dict[str, int]
    seccomp: str
    #: The shared mode's engine (None: the caller's child is the stack).
    engine_pid: int | None = None


def served_stack(argv_log: Path, shared_rundir: Path | None = None) -> ServedStack:
    """The one stack the caller started (its ``--help`` probes aside), checked to be
    pyslirp itself (the shim execs), with its capabilities and seccomp mode; in the
    shared mode (``shared_rundir``) those of the engine serving it."""
    recorded = [line.split() for line in argv_log.read_text().splitlines()]
    served = [r for r in recorded if "--help" not in r]
    assert len(served) == 1, recorded
    pid = int(served[0][0])
    assert alive(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"pyslirp" in cmdline, cmdline  # exec'd: the caller's child IS the stack
    engine = shared_engine_pid(shared_rundir) if shared_rundir else None
    if shared_rundir is not None:
        assert engine is not None and engine != pid, "no shared engine serves it"
    serving = engine or pid
    seccomp = next(line.split()[1] for line in Path(f"/proc/{serving}/status").read_text()
                   .splitlines() if line.startswith("Seccomp:"))
    return ServedStack(pid, served[0][1:], [r[1:] for r in recorded],
                       sandbox.capabilities(serving), seccomp, engine)
