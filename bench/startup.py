#!/usr/bin/env python3
"""Start-up latency of pyslirp next to slirp4netns: exec to TAP present, exec to ready-fd.

Theory of operation
-------------------
For each start a fresh target (``unshare --net sleep``, or ``-U -n`` with
``--userns``) is made, then the program under test is spawned with
``os.posix_spawn`` (the clock starts just before it: that call is the exec)
with a ready pipe (``-r``) and, for podman's flags, an exit pipe (``-e``).
Meanwhile this process polls for the TAP with ``SIOCGIFINDEX`` on a socket
created inside the target namespace (device ioctls act in the namespace the
socket was made in, so no sysfs remount is needed) every 0.2 ms, and
waits for the ready byte in ``select`` in between (as podman blocks on the
pipe), so the program under test keeps both CPUs of a 2-CPU machine: its
TAP helper and its own start run side by side (measure on a quiet machine).
Medians (and min/max) of ``--runs`` starts are printed per program and flag
set.

Flag sets: ``cr`` is ``-c -r FD PID tap0``; ``podman`` is what podman 4.3
passes (``--disable-host-loopback --mtu=65520 --enable-sandbox
--enable-seccomp --enable-ipv6 -c -e FD -r FD PID tap0``); ``api`` adds
``--api-socket``. ``-v`` and ``--help`` are timed as exec to exit.

``--cpu`` adds the CPU time (user + system, wait4) from exec to the ready
byte, from a separate start: pyslirp run as ``-m pyslirp`` exits right at
the byte, another program is killed then. On a shared machine this moves
far less than the wall clock.

Run as root: ``python3 bench/startup.py --runs 15 [--cpu] [--pyslirp CMD] [--baseline CMD]
[--only pyslirp]``; CMD is e.g. ``"VENV/bin/python -I -m pyslirp"`` (what the shim
runs) for a ``pip install .`` (not editable: its import hook costs milliseconds).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

CLONE_NEWNET = 0x40000000
SIOCGIFINDEX = 0x8933
#: How often the TAP is looked for (each look is one ioctl; in between, the CPU is free).
POLL_S = 0.0002
_libc = ctypes.CDLL("libc.so.6", use_errno=True)

FLAG_SETS = {
    "cr": lambda ready, exit_, api: ["-c", "-r", str(ready)],
    "podman": lambda ready, exit_, api: [
        "--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
        "--enable-ipv6", "-c", "-e", str(exit_), "-r", str(ready)],
    "api": lambda ready, exit_, api: [
        "--disable-host-loopback", "--mtu=65520", "--enable-sandbox", "--enable-seccomp",
        "--enable-ipv6", "-c", "-e", str(exit_), "-r", str(ready), f"--api-socket={api}"],
}


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_netns(pid: int) -> socket.socket:
    """A datagram socket created in ``pid``'s network namespace (we stay in ours)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def has_interface(sock: socket.socket, name: bytes) -> bool:
    try:
        fcntl.ioctl(sock, SIOCGIFINDEX, struct.pack("16s24x", name))
    except OSError:
        return False
    return True


def make_target(userns: bool) -> subprocess.Popen[bytes]:
    flags = ["-U", "-n", "--map-root-user"] if userns else ["-n"]
    proc = subprocess.Popen(["unshare", *flags, "sleep", "1000"])
    deadline = time.monotonic() + 5
    own = os.stat("/proc/self/ns/net").st_ino
    while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == own:
        if time.monotonic() > deadline:
            raise RuntimeError("unshare did not enter a new netns")
        time.sleep(0.001)
    return proc


def one_start(cmd: list[str], flagset: str, userns: bool, tmp: str) -> tuple[float, float]:
    """(ms exec→TAP present, ms exec→ready byte) for one start."""
    target = make_target(userns)
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    api = os.path.join(tmp, "api.sock")
    if os.path.exists(api):
        os.unlink(api)
    sock = socket_in_netns(target.pid)
    os.set_blocking(ready_r, False)
    os.set_inheritable(ready_w, True)
    os.set_inheritable(exit_r, True)
    argv = cmd + FLAG_SETS[flagset](ready_w, exit_r, api) + [str(target.pid), "tap0"]
    tap_ms = ready_ms = -1.0
    t0 = time.monotonic_ns()
    child = os.posix_spawnp(argv[0], argv, os.environ,
                            file_actions=[(os.POSIX_SPAWN_CLOSE, ready_r),
                                          (os.POSIX_SPAWN_CLOSE, exit_w),
                                          (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                          (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    try:
        deadline = t0 + 10_000_000_000
        while (tap_ms < 0 or ready_ms < 0) and time.monotonic_ns() < deadline:
            if tap_ms < 0 and has_interface(sock, b"tap0"):
                tap_ms = (time.monotonic_ns() - t0) / 1e6
            if ready_ms < 0:
                # Wait in select, as podman waits on the pipe: a busy loop here would take
                # one of the machine's CPUs from the program under test.
                wait = POLL_S if tap_ms < 0 else (deadline - time.monotonic_ns()) / 1e9
                if select.select([ready_r], [], [], max(wait, 0))[0] and os.read(ready_r, 1):
                    ready_ms = (time.monotonic_ns() - t0) / 1e6
            else:
                time.sleep(POLL_S)
        if tap_ms < 0 or ready_ms < 0:
            raise RuntimeError(f"{shlex.join(argv)}: no TAP or no ready byte within 10 s")
    finally:
        os.kill(child, signal.SIGTERM)
        os.waitpid(child, 0)
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        sock.close()
        target.kill()
        target.wait()
    return tap_ms, ready_ms


#: Runs ``-m pyslirp`` as runpy does, but ends the process the moment it writes the ready
#: byte, so that its CPU time (wait4) is exactly what the start cost.
_EXIT_AT_READY = """
import os, runpy, sys
fd = int(sys.argv.pop(1))
real_write = os.write
def write(target, data):
    n = real_write(target, data)
    if target == fd:
        os._exit(0)
    return n
os.write = write
runpy.run_module("pyslirp", run_name="__main__", alter_sys=True)
"""


def cpu_to_ready(cmd: list[str], flagset: str, userns: bool, tmp: str) -> float:
    """CPU ms (user + system, with the TAP helper it reaped) from exec to the ready byte.

    Unlike the wall clock this hardly moves with the machine's load. pyslirp
    (``PYTHON ... -m pyslirp``) exits right at the byte; any other program is
    killed once the byte is read (slirp4netns idles by then).
    """
    target = make_target(userns)
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    api = os.path.join(tmp, "api.sock")
    if os.path.exists(api):
        os.unlink(api)
    os.set_inheritable(ready_w, True)
    os.set_inheritable(exit_r, True)
    if cmd[-2:] == ["-m", "pyslirp"]:
        cmd = cmd[:-2] + ["-c", _EXIT_AT_READY, str(ready_w)]
    argv = cmd + FLAG_SETS[flagset](ready_w, exit_r, api) + [str(target.pid), "tap0"]
    child = os.posix_spawnp(argv[0], argv, os.environ,
                            file_actions=[(os.POSIX_SPAWN_CLOSE, ready_r),
                                          (os.POSIX_SPAWN_CLOSE, exit_w),
                                          (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                          (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
    os.close(ready_w)
    try:
        if not select.select([ready_r], [], [], 10)[0] or os.read(ready_r, 1) != b"1":
            raise RuntimeError(f"{shlex.join(argv)}: no ready byte within 10 s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # pyslirp has exited already
        _, _, usage = os.wait4(child, 0)
        for fd in (ready_r, exit_r, exit_w):
            os.close(fd)
        target.kill()
        target.wait()
    return (usage.ru_utime + usage.ru_stime) * 1000


def time_exit(argv: list[str]) -> float:
    t0 = time.monotonic_ns()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return (time.monotonic_ns() - t0) / 1e6


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--pyslirp", default=shutil.which("pyslirp") or "pyslirp",
                    help="command for pyslirp (split with shlex)")
    ap.add_argument("--slirp4netns", default=shutil.which("slirp4netns") or "")
    ap.add_argument("--baseline", help="another pyslirp command, measured interleaved as "
                    "'baseline' (e.g. a venv with the code before a change)")
    ap.add_argument("--only", choices=("pyslirp", "slirp4netns"))
    ap.add_argument("--flags", default="cr,podman,api")
    ap.add_argument("--userns", action="store_true", help="targets in a new user namespace")
    ap.add_argument("--cpu", action="store_true", help="also the CPU time to the ready byte "
                    "(a separate start each; steady under load, unlike the wall clock)")
    args = ap.parse_args()
    programs = {"pyslirp": shlex.split(args.pyslirp)}
    if args.slirp4netns:
        programs["slirp4netns"] = [args.slirp4netns]
    if args.only:
        programs = {args.only: programs[args.only]}
    if args.baseline:
        programs["baseline"] = shlex.split(args.baseline)
    print(f"{'program':12} {'flags':7} {'exec->TAP ms':>22} {'exec->ready ms':>22}"
          + (f" {'CPU to ready ms':>22}" if args.cpu else ""))
    with tempfile.TemporaryDirectory(prefix="pyslirp-startup-bench-") as tmp:
        for flagset in args.flags.split(","):
            taps: dict[str, list[float]] = {name: [] for name in programs}
            readies: dict[str, list[float]] = {name: [] for name in programs}
            cpus: dict[str, list[float]] = {name: [] for name in programs}
            for _ in range(args.runs):  # interleaved, so a load change hits both alike
                for name, cmd in programs.items():
                    tap, ready = one_start(cmd, flagset, args.userns, tmp)
                    taps[name].append(tap)
                    readies[name].append(ready)
                    if args.cpu:
                        cpus[name].append(cpu_to_ready(cmd, flagset, args.userns, tmp))
            for name in programs:
                print(f"{name:12} {flagset:7} {_fmt(taps[name]):>22} {_fmt(readies[name]):>22}"
                      + (f" {_fmt(cpus[name]):>22}" if args.cpu else ""))
    pyslirp = shlex.split(args.pyslirp)
    # The floor: the interpreter pyslirp runs in, doing nothing.
    interpreter = [pyslirp[0], "-I"] if "python" in os.path.basename(pyslirp[0]) else \
        [sys.executable, "-I"]
    for label, argv in (("-v", pyslirp + ["-v"]), ("--help", pyslirp + ["--help"]),
                        ("pass", interpreter + ["-c", "pass"])):
        runs = [time_exit(argv) for _ in range(args.runs)]
        name = "python" if label == "pass" else "pyslirp"
        print(f"{name:12} {label:7} {'exec->exit ms':>22} {_fmt(runs):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
