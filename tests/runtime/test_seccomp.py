"""--enable-seccomp's filter: blocked calls kill the caller with SIGSYS, everything else works.

Every filter is installed in a forked child (a filter can never be removed);
the child reports over a pipe and the parent looks at how it ended. Both
ways of building the filter (libseccomp and the hand-built BPF program) are
driven through the same cases.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import threading
from collections.abc import Callable

import pytest

from pyslirp.runtime import seccomp

needs_table = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"),
                                 reason="no syscall table for this machine")
BACKENDS = [pytest.param(False, id="bpf"),
            pytest.param(True, id="libseccomp", marks=pytest.mark.skipif(
                seccomp.libseccomp_version() is None, reason="libseccomp not installed"))]

_libc = ctypes.CDLL(None, use_errno=True)


def run_filtered(use_libseccomp: bool, action: Callable[[], object],
                 names: tuple[str, ...] = seccomp.BLOCKED) -> tuple[str, bytes]:
    """Install the filter in a child, run ``action``; ("exit", n) / ("signal", SIG) and output."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        status = 0
        try:
            os.close(r)
            seccomp.install(use_libseccomp=use_libseccomp, names=names)
            result = action()
            os.write(w, repr(result).encode())
        except BaseException as exc:  # noqa: BLE001 - report anything to the parent
            os.write(w, f"{type(exc).__name__}: {exc}".encode())
            status = 3
        os._exit(status)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, st = os.waitpid(pid, 0)
    if os.WIFSIGNALED(st):
        return f"signal {signal.Signals(os.WTERMSIG(st)).name}", out
    return f"exit {os.WEXITSTATUS(st)}", out


def _execve() -> None:
    os.execv("/bin/true", ["true"])


def _unshare_mount() -> int:
    return int(_libc.unshare(0x00020000))


def _mount() -> int:
    return int(_libc.mount(b"none", b"/nonexistent", b"tmpfs", 0, None))


def _umount2() -> int:
    return int(_libc.umount2(b"/nonexistent", 0))


def _prctl() -> int:
    return int(_libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE: harmless, yet every prctl is blocked


def _ptrace() -> int:
    return int(_libc.ptrace(0, 0, None, None))  # PTRACE_TRACEME


def _setns() -> int:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    return int(_libc.setns(fd, 0))


def _init_module() -> int:
    return int(_libc.syscall(seccomp.SYSCALLS[seccomp.native_arches()[0]]["init_module"],
                             None, 0, b""))


def _execve_from_a_thread() -> None:
    # TSYNC and KILL_PROCESS: a thread's execve takes the whole process down.
    t = threading.Thread(target=_execve)
    t.start()
    t.join()


@needs_table
@pytest.mark.parametrize("use_libseccomp", BACKENDS)
@pytest.mark.parametrize("call", [_execve, _unshare_mount, _mount, _umount2, _prctl, _ptrace,
                                  _setns, _init_module, _execve_from_a_thread],
                         ids=lambda f: f.__name__.strip("_"))
def test_blocked_call_kills_with_sigsys(use_libseccomp: bool, call: Callable[[], object]) -> None:
    how, out = run_filtered(use_libseccomp, call)
    assert how == "signal SIGSYS", out


def _what_pyslirp_does_at_runtime() -> str:
    # The resolv.conf watcher's stat + open, host sockets of every kind the engine opens,
    # a thread (asyncio's executor), fork-free subprocess-free work.
    os.stat("/etc/resolv.conf")
    with open("/etc/resolv.conf", "rb") as f:
        f.read()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    client = socket.create_connection(tcp.getsockname(), timeout=5)
    conn, _ = tcp.accept()
    client.sendall(b"ping")
    got = conn.recv(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.sendto(b"u", udp.getsockname())
    got += udp.recv(1)
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(os.getpid()))
    t.start()
    t.join()
    for s in (tcp, client, conn, udp):
        s.close()
    return got.decode() + str(len(done)) + str(seccomp.seccomp_mode())


@needs_table
@pytest.mark.parametrize("use_libseccomp", BACKENDS)
def test_everything_the_stack_needs_still_works(use_libseccomp: bool) -> None:
    how, out = run_filtered(use_libseccomp, _what_pyslirp_does_at_runtime)
    assert (how, out) == ("exit 0", b"'pingu12'")  # 2 = SECCOMP_MODE_FILTER


def test_filter_is_not_installed_here() -> None:
    assert seccomp.seccomp_mode() == 0  # the tests above only ever filtered their children


@needs_table
def test_bpf_program_shape() -> None:
    arches = seccomp.native_arches()
    prog = seccomp.build_bpf(arches)
    # loads the arch first, kills unknown architectures, ends every block with ALLOW, KILL
    assert prog[0] == (0x20, 0, 0, 4)
    rets = [k for code, _jt, _jf, k in prog if code == 0x06]
    assert rets.count(seccomp.SECCOMP_RET_ALLOW) == len([a for a in arches
                                                          if a != seccomp.SCMP_ARCH_X32])
    assert all(k in (seccomp.SECCOMP_RET_ALLOW, seccomp.SECCOMP_RET_KILL_PROCESS)
               for k in rets)


@needs_table
def test_every_blocked_name_has_a_number_on_the_native_arch() -> None:
    native = seccomp.SYSCALLS[seccomp.native_arches()[0]]
    missing = [n for n in seccomp.BLOCKED if n not in native]
    assert missing == ["umount"]  # only i386 (and x86 compat) still has it
    assert set(seccomp.SLIRP4NETNS_BLOCKED) <= set(seccomp.BLOCKED)


@pytest.mark.skipif(seccomp.libseccomp_version() is None, reason="libseccomp not installed")
@pytest.mark.parametrize("arch", sorted(seccomp.SYSCALLS), ids=hex)
def test_tables_agree_with_libseccomp(arch: int) -> None:
    for name in seccomp.BLOCKED:
        assert seccomp.SYSCALLS[arch].get(name) == seccomp.resolve_with_libseccomp(arch, name), \
            name


# --- the CNI engine's filter ------------------------------------------------------------

@needs_table
@pytest.mark.parametrize("use_libseccomp", BACKENDS)
@pytest.mark.parametrize("call", [_execve, _unshare_mount, _mount, _ptrace, _init_module,
                                  _execve_from_a_thread], ids=lambda f: f.__name__.strip("_"))
def test_engine_filter_still_kills_escapes(use_libseccomp: bool,
                                           call: Callable[[], object]) -> None:
    how, out = run_filtered(use_libseccomp, call, seccomp.ENGINE_BLOCKED)
    assert how == "signal SIGSYS", out


def _open_tap_in(path: str) -> Callable[[], object]:
    def action() -> object:
        from pyslirp.runtime.tap import open_tap

        with open_tap(path, "path", configure=None) as handle:
            return handle.name
    return action


@needs_table
@pytest.mark.e2e
@pytest.mark.parametrize("use_libseccomp", BACKENDS)
def test_engine_filter_lets_its_helpers_open_taps(use_libseccomp: bool) -> None:
    # The helper inherits the filter, makes itself non-dumpable (prctl) and joins the
    # namespace (setns): both must stay allowed, the rest of what the engine does too.
    from tests import nsutil

    nsutil.skip_unless_capable()
    with nsutil.NetNS("seccomp") as ns:
        how, out = run_filtered(use_libseccomp, _open_tap_in(ns.path), seccomp.ENGINE_BLOCKED)
        assert (how, out) == ("exit 0", b"'tap0'")
        how, out = run_filtered(use_libseccomp, _what_pyslirp_does_at_runtime,
                                seccomp.ENGINE_BLOCKED)
        assert (how, out) == ("exit 0", b"'pingu12'")
