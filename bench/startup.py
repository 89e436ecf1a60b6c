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
pipe), so the program under test keeps both CPUs of a 2-CPU machine
(measure on a quiet machine). Medians (and
min/max) of ``--runs`` starts are printed per program and flag set, with the
CPU time the started process used (``wait4``'s rusage, the process and the
helpers it reaped; it is stopped right after the ready byte): on a loaded
machine that moves far less than the wall-clock figures. In the shared mode it
is the caller's side only (the engine's share is not in it).

Flag sets: ``cr`` is ``-c -r FD PID tap0``; ``podman`` is what podman 4.3
passes (``--disable-host-loopback --mtu=65520 --enable-sandbox
--enable-seccomp --enable-ipv6 -c -e FD -r FD PID tap0``); ``api`` adds
``--api-socket``. ``-v`` and ``--help`` are timed as exec to exit.

Run as root: ``python3 bench/startup.py --runs 15 [--pyslirp CMD] [--baseline CMD]
[--only pyslirp] [--shared]``; CMD is e.g. ``"VENV/bin/python -I -m pyslirp"`` (what the shim
runs) for a ``pip install .`` (not editable: its import hook costs milliseconds).

``--shared`` adds ``pyslirp-shared``: the same command with ``PYSLIRP_SHARED_ENGINE=1``
and a runtime directory of this run, so every start hands its TAP to one engine
(docs/shared-engine.md). The engine is started (and timed, as ``engine cold``) by one
start before the measured ones: the figures are those of a warm engine, what every
container but a machine's first sees.

``--footprint N`` instead starts N namespaces at once with each mode (one process per
namespace, and with ``--shared`` the shared mode) and reports, 0.5 s after the last
ready byte, the RSS, PSS and private memory (Private_Clean + Private_Dirty from
``/proc/PID/smaps_rollup``) of every process pyslirp leaves running: the N
processes, or the N waiters plus the engine; the total and per namespace.

bench/run.py's ``startup`` and ``footprint`` workloads call ``one_start`` and
``footprint`` with ``argv_for`` (a command line other than slirp4netns's: pasta's) and
``ready_on_exit`` (a program that says it is ready by exiting after it forked into the
background, as pasta does); programs are started with SIGPIPE and SIGXFSZ at their
defaults, as a shell starts them (pasta will not start with SIGPIPE ignored).

The whole run happens in a private mount namespace of its own: slirp4netns
1.2.0's ``--enable-sandbox`` started in the host's mount namespace unmounts
every ``ip netns`` namespace of the host (docs/testing.md), and this runs it
hundreds of times.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
#: How often the TAP is looked for while the ready byte is awaited.
POLL_S = 0.0002
SIOCGIFINDEX = 0x8933
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


#: Builds the full command line for one start: (target PID, ready-fd, exit-fd, API
#: socket path, PID file path) -> argv.
ArgvFor = Callable[[int, int, int, str, str], list[str]]


def slirp_argv(cmd: list[str], flagset: str) -> ArgvFor:
    """slirp4netns's command line (what pyslirp takes too): ``cmd FLAGS PID tap0``."""
    def build(pid: int, ready_w: int, exit_r: int, api: str, _pidfile: str) -> list[str]:
        return cmd + FLAG_SETS[flagset](ready_w, exit_r, api) + [str(pid), "tap0"]
    return build


def _spawn(argv: list[str], env: dict[str, str] | None, ready_r: int, exit_w: int) -> int:
    # The signals Python ignores back to their defaults, as a shell (or subprocess) would
    # start the program: pasta refuses to start with SIGPIPE ignored.
    return os.posix_spawnp(argv[0], argv, env or os.environ,
                           setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                           file_actions=[(os.POSIX_SPAWN_CLOSE, ready_r),
                                         (os.POSIX_SPAWN_CLOSE, exit_w),
                                         (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                         (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])


def _daemon_pid(pidfile: str) -> int:
    with open(pidfile) as f:
        return int(f.read().split()[0])


def stop_daemon(pid: int) -> None:
    """SIGTERM a process that is not our child (a daemonized program) and wait for it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([pidfd], [], [], 5)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], 5)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def one_start(cmd: list[str], flagset: str, userns: bool, tmp: str,
              env: dict[str, str] | None = None, *, argv_for: ArgvFor | None = None,
              ready_on_exit: bool = False) -> tuple[float, float, float]:
    """(ms exec→TAP present, ms exec→ready byte, ms of CPU the started process used until
    it was stopped right after) for one start. The CPU time (``wait4``'s rusage: the
    process and the helpers it waited for) moves far less with the machine's load.

    ``argv_for`` replaces slirp4netns's command line (``cmd`` and ``flagset`` are then
    unused). ``ready_on_exit``: the program says it is ready by exiting 0 after forking
    into the background (pasta, given ``-P PIDFILE``): "ready" is that exit, the CPU
    is the started process's until then, and the daemon (from the PID file) is stopped."""
    target = make_target(userns)
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    api = os.path.join(tmp, "api.sock")
    pidfile = os.path.join(tmp, "daemon.pid")
    for path in (api, pidfile):
        if os.path.exists(path):
            os.unlink(path)
    sock = socket_in_netns(target.pid)
    os.set_blocking(ready_r, False)
    os.set_inheritable(ready_w, True)
    os.set_inheritable(exit_r, True)
    argv = (argv_for or slirp_argv(cmd, flagset))(target.pid, ready_w, exit_r, api, pidfile)
    tap_ms = ready_ms = -1.0
    cpu_ms = 0.0
    reaped = False
    t0 = time.monotonic_ns()
    child = _spawn(argv, env, ready_r, exit_w)
    pidfd = os.pidfd_open(child)
    # What "ready" looks like: a byte on the ready pipe, or the started process's exit.
    ready_on = pidfd if ready_on_exit else ready_r
    try:
        deadline = t0 + 10_000_000_000
        while (tap_ms < 0 or ready_ms < 0) and time.monotonic_ns() < deadline:
            if tap_ms < 0 and has_interface(sock, b"tap0"):
                tap_ms = (time.monotonic_ns() - t0) / 1e6
            if ready_ms < 0:
                # Wait in select, as podman waits on the pipe: a busy loop here would take
                # one of the machine's CPUs from the program under test.
                wait = POLL_S if tap_ms < 0 else (deadline - time.monotonic_ns()) / 1e9
                if select.select([ready_on], [], [], max(wait, 0))[0]:
                    now = (time.monotonic_ns() - t0) / 1e6
                    if not ready_on_exit and os.read(ready_r, 1):
                        ready_ms = now
                    elif ready_on_exit:
                        _pid, status, usage = os.wait4(child, 0)
                        reaped = True
                        cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
                        if os.waitstatus_to_exitcode(status) != 0:
                            raise RuntimeError(f"{shlex.join(argv)}: exit status "
                                               f"{os.waitstatus_to_exitcode(status)}")
                        ready_ms = now
            else:
                time.sleep(POLL_S)
        if tap_ms < 0 or ready_ms < 0:
            raise RuntimeError(f"{shlex.join(argv)}: no TAP or no ready byte within 10 s")
    finally:
        if not reaped:
            os.kill(child, signal.SIGTERM)
            _pid, _status, usage = os.wait4(child, 0)
            cpu_ms = (usage.ru_utime + usage.ru_stime) * 1000
        if ready_on_exit and os.path.exists(pidfile):
            stop_daemon(_daemon_pid(pidfile))
        for fd in (ready_r, ready_w, exit_r, exit_w, pidfd):
            os.close(fd)
        sock.close()
        target.kill()
        target.wait()
    return tap_ms, ready_ms, cpu_ms


def shared_env(tmp: str) -> dict[str, str]:
    return {**os.environ, "PYSLIRP_SHARED_ENGINE": "1",
            "PYSLIRP_RUNDIR": os.path.join(tmp, "rundir"),
            "PYSLIRP_CNI_IDLE_EXIT": "3600"}  # stays up between the starts


def engine_pid(tmp: str) -> int | None:
    """The shared engine of this run (SO_PEERCRED on its drop-in socket), or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(os.path.join(tmp, "rundir", "dropin.sock"))
        except OSError:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[:4], sys.byteorder)


def stop_engine(tmp: str) -> None:
    pid = engine_pid(tmp)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.01)


def memory_kb(pid: int) -> dict[str, int]:
    """RSS, PSS and private (clean + dirty) memory of ``pid``, in kB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "private": fields["Private_Clean"] + fields["Private_Dirty"]}


def footprint(cmd: list[str], count: int, flagset: str, env: dict[str, str] | None,
              tmp: str, *, argv_for: ArgvFor | None = None, ready_on_exit: bool = False,
              userns: bool = False) -> dict[str, int]:
    """The memory of every process ``count`` running starts of ``cmd`` leave (kB, summed).
    ``argv_for`` and ``ready_on_exit`` as for one_start: with the latter, what stays
    running is each start's daemon (its PID file)."""
    targets, children, daemons, fds = [], [], [], []
    try:
        for i in range(count):
            target = make_target(userns)
            targets.append(target)
            ready_r, ready_w = os.pipe()
            exit_r, exit_w = os.pipe()
            fds += [ready_r, exit_w]
            os.set_inheritable(ready_w, True)
            os.set_inheritable(exit_r, True)
            api = os.path.join(tmp, f"api-{i}.sock")
            pidfile = os.path.join(tmp, f"daemon-{i}.pid")
            argv = (argv_for or slirp_argv(cmd, flagset))(target.pid, ready_w, exit_r, api,
                                                          pidfile)
            child = _spawn(argv, env, ready_r, exit_w)
            os.close(ready_w)
            os.close(exit_r)
            if ready_on_exit:
                status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
                if status != 0:
                    raise RuntimeError(f"{shlex.join(argv)}: exit status {status}")
                daemons.append(_daemon_pid(pidfile))
                continue
            children.append(child)
            if os.read(ready_r, 1) != b"1":
                raise RuntimeError(f"{shlex.join(argv)}: no ready byte")
        time.sleep(0.5)
        pids = children + daemons
        engine = engine_pid(tmp) if env is not None else None
        if engine is not None:
            pids.append(engine)
        total = {"rss": 0, "pss": 0, "private": 0, "processes": len(pids)}
        for pid in pids:
            for key, value in memory_kb(pid).items():
                total[key] += value
        if engine is not None:
            total["engine_private"] = memory_kb(engine)["private"]
        return total
    finally:
        for child in children:
            os.kill(child, signal.SIGTERM)
        for child in children:
            os.waitpid(child, 0)
        for daemon in daemons:
            stop_daemon(daemon)
        for fd in fds:
            os.close(fd)
        for target in targets:
            target.kill()
            target.wait()


def run_footprint(programs: dict[str, list[str]], count: int, flagset: str,
                  shared: bool) -> None:
    modes: list[tuple[str, list[str], bool]] = [(n, c, False) for n, c in programs.items()]
    if shared:
        modes.append(("pyslirp-shared", programs["pyslirp"], True))
    print(f"{count} namespaces, flags {flagset}: kB over every process left running")
    print(f"{'program':15} {'procs':>5} {'RSS':>9} {'PSS':>9} {'private':>9} "
          f"{'private/ns':>10} {'engine private':>14}")
    for name, cmd, is_shared in modes:
        with tempfile.TemporaryDirectory(prefix="pyslirp-footprint-") as tmp:
            try:
                got = footprint(cmd, count, flagset, shared_env(tmp) if is_shared else None, tmp)
            finally:
                if is_shared:
                    stop_engine(tmp)
        print(f"{name:15} {got['processes']:5d} {got['rss']:9d} {got['pss']:9d} "
              f"{got['private']:9d} {got['private'] / count:10.0f} "
              f"{got.get('engine_private', 0):14d}")


def time_exit(argv: list[str]) -> float:
    t0 = time.monotonic_ns()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    return (time.monotonic_ns() - t0) / 1e6


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} ({min(values):.1f}-{max(values):.1f})"


def private_mount_namespace() -> None:
    """Move this process (and what it starts) into a mount namespace whose mounts are all
    private, so nothing a started program unmounts reaches the host's (see above)."""
    if _libc.unshare(CLONE_NEWNS) != 0 or _libc.mount(b"none", b"/", None,
                                                      MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"private mount namespace: {os.strerror(err)}")


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
    ap.add_argument("--shared", action="store_true",
                    help="also pyslirp in the shared-engine mode (PYSLIRP_SHARED_ENGINE=1)")
    ap.add_argument("--footprint", type=int, metavar="N",
                    help="measure the memory of N running namespaces per mode instead")
    args = ap.parse_args()
    private_mount_namespace()
    programs = {"pyslirp": shlex.split(args.pyslirp)}
    if args.slirp4netns:
        programs["slirp4netns"] = [args.slirp4netns]
    if args.only:
        programs = {args.only: programs[args.only]}
    if args.baseline:
        programs["baseline"] = shlex.split(args.baseline)
    if args.footprint:
        for flagset in args.flags.split(","):
            run_footprint(programs, args.footprint, flagset, args.shared)
        return 0
    print(f"{'program':15} {'flags':7} {'exec->TAP ms':>22} {'exec->ready ms':>22} "
          f"{'caller CPU ms':>22}")
    with tempfile.TemporaryDirectory(prefix="pyslirp-startup-bench-") as tmp:
        envs: dict[str, dict[str, str] | None] = {name: None for name in programs}
        if args.shared:
            programs["pyslirp-shared"] = programs.get("pyslirp") or shlex.split(args.pyslirp)
            envs["pyslirp-shared"] = shared_env(tmp)
            cold = one_start(programs["pyslirp-shared"], "cr", args.userns, tmp,
                             envs["pyslirp-shared"])
            print(f"{'pyslirp-shared':15} {'cold':7} {cold[0]:22.1f} {cold[1]:22.1f} "
                  f"{cold[2]:22.1f}  (one start, the engine started by it)")
        try:
            for flagset in args.flags.split(","):
                taps: dict[str, list[float]] = {name: [] for name in programs}
                readies: dict[str, list[float]] = {name: [] for name in programs}
                cpus: dict[str, list[float]] = {name: [] for name in programs}
                for _ in range(args.runs):  # interleaved, so a load change hits all alike
                    for name, cmd in programs.items():
                        tap, ready, cpu = one_start(cmd, flagset, args.userns, tmp, envs[name])
                        taps[name].append(tap)
                        readies[name].append(ready)
                        cpus[name].append(cpu)
                for name in programs:
                    print(f"{name:15} {flagset:7} {_fmt(taps[name]):>22} "
                          f"{_fmt(readies[name]):>22} {_fmt(cpus[name]):>22}")
        finally:
            stop_engine(tmp)
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
