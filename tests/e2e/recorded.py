"""What the tests of callers that start ``slirp4netns`` themselves share (rootlesskit,
podman): pyslirp's shim behind an argument recorder, waiting for the caller's command
inside to come up, and a look at the stack process the caller started."""

from __future__ import annotations

import os
import shlex
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


def install_recorded_shim(work: Path) -> Path:
    """``pyslirp shim install`` into ``work/shim``, behind ``work/slirp4netns``: a script
    that appends ``PID ARGS...`` to ``work/argv.log`` and execs the shim, so PID is the
    stack's. Returns the recorder, the path to give the caller as slirp4netns."""
    shim_dir = work / "shim"
    shim_dir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pyslirp", "shim", "install", str(shim_dir)],
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


@dataclass
class ServedStack:
    pid: int
    args: list[str]
    #: Every call the recorder saw, ``--help`` probes included (arguments only).
    calls: list[list[str]]
    caps: dict[str, int]
    seccomp: str


def served_stack(argv_log: Path) -> ServedStack:
    """The one stack the caller started (its ``--help`` probes aside), checked to be
    pyslirp itself (the shim execs), with its capabilities and seccomp mode."""
    recorded = [line.split() for line in argv_log.read_text().splitlines()]
    served = [r for r in recorded if "--help" not in r]
    assert len(served) == 1, recorded
    pid = int(served[0][0])
    assert alive(pid)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"pyslirp" in cmdline, cmdline  # exec'd: the caller's child IS the stack
    seccomp = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                   .splitlines() if line.startswith("Seccomp:"))
    return ServedStack(pid, served[0][1:], [r[1:] for r in recorded], sandbox.capabilities(pid),
                       seccomp)
