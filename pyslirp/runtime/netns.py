"""Linux namespace system calls that Python 3.11's ``os`` module lacks.

Theory of operation
-------------------
Python 3.12 grew ``os.setns`` and ``os.unshare``; 3.11 has neither, so this
module binds ``setns(2)``, ``unshare(2)``, ``mount(2)`` and ``prctl(2)`` from
the C library with ctypes and raises ``OSError`` (with the errno and a message
naming what was attempted) the way ``os`` functions do.

A namespace is identified by the (device, inode) pair of its ``/proc/PID/ns/*``
file (namespaces(7)); two processes share a namespace exactly when those pairs
are equal. :func:`userns_differs` uses that to decide whether joining a target's
network namespace must be preceded by joining its user namespace: setns(2) on a
user namespace one is already in fails with EINVAL, and a network namespace
owned by another user namespace can usually only be joined (and a TAP created
in it) with the capabilities one gains by joining that user namespace first.

Forked helpers that join another user namespace call :func:`set_dumpable`
(False) and :func:`close_fds_except` first: once the helper is in the
target's user namespace, whoever is root there must not be able to ptrace
it or read ``/proc/PID/fd``, and it must not carry the parent's other fds
(in the CNI engine: other containers' TAPs and sockets) where that could
matter.

What it deliberately does not do: no fork/exec policy (see ``tap.py`` and
``spawn.py``), and nothing here is safe to call from a multithreaded process
for user namespaces (the kernel refuses ``setns``/``unshare`` of a user
namespace unless the caller is single-threaded): call those in a forked child.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

# <linux/sched.h>
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4

# <linux/nsfs.h>: _IO(0xb7, 0x1), an fd for the user namespace owning a namespace.
NS_GET_USERNS = 0xB701



def _load_libc() -> ctypes.CDLL:
    """The C library, by soname: ctypes.util.find_library would run ``ldconfig -p``.

    dlopen(NULL) (the interpreter's own symbols, libc among them) is the fallback,
    for a C library under another soname (musl).
    """
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - glibc is libc.so.6 on every Linux port
        return ctypes.CDLL(None, use_errno=True)


_libc = _load_libc()
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

_NS_NAMES = {
    CLONE_NEWNS: "mount", CLONE_NEWCGROUP: "cgroup", CLONE_NEWUTS: "uts",
    CLONE_NEWIPC: "ipc", CLONE_NEWUSER: "user", CLONE_NEWPID: "pid", CLONE_NEWNET: "network",
    CLONE_NEWTIME: "time",
}


def _flag_names(flags: int) -> str:
    names = [name for bit, name in _NS_NAMES.items() if flags & bit]
    return "+".join(names) if names else hex(flags)


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace ``fd`` refers to (``nstype`` 0 accepts any kind)."""
    if _libc.setns(fd, nstype) != 0:
        _raise(f"setns({_flag_names(nstype) if nstype else 'any'})")


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces of the kinds in ``flags``."""
    if _libc.unshare(flags) != 0:
        _raise(f"unshare({_flag_names(flags)})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        _raise(f"mount {source or 'none'} on {target}")


def set_pdeathsig(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent *thread* exits."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        _raise("prctl(PR_SET_PDEATHSIG)")


def set_dumpable(dumpable: bool) -> None:
    """Set this process's "dumpable" attribute (prctl(2) ``PR_SET_DUMPABLE``).

    A non-dumpable process cannot be ptraced, and its ``/proc/PID/fd``,
    ``/proc/PID/mem`` etc. belong to root, except for callers with
    ``CAP_SYS_PTRACE`` in the user namespace it was *created* in: being root in
    a user namespace it joins later does not reach it.
    """
    if _libc.prctl(PR_SET_DUMPABLE, int(dumpable), 0, 0, 0) != 0:
        _raise("prctl(PR_SET_DUMPABLE)")


def is_dumpable() -> bool:
    """This process's "dumpable" attribute (prctl(2) ``PR_GET_DUMPABLE``)."""
    return bool(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) > 0)


def close_fds_except(keep: Iterable[int]) -> None:
    """Close every file descriptor above 2 that is not in ``keep`` (a forked child's hygiene).

    The standard streams stay: a stray message must not land in a TAP or a
    socket that took fd 2's number. ``closerange`` is one close_range(2) call
    on Linux 5.9+; it only reaches the soft RLIMIT_NOFILE, so whatever is
    left above that (a limit lowered after the fds were opened) is found in
    ``/proc/self/fd``.
    """
    wanted = sorted({fd for fd in keep if fd > 2})
    limit = max(os.sysconf("SC_OPEN_MAX"), (wanted[-1] + 1) if wanted else 3)
    low = 3
    for fd in wanted:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, limit)
    with contextlib.suppress(OSError):  # no /proc: closerange did what it could
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in wanted:
                with contextlib.suppress(OSError):  # listdir's own, already closed
                    os.close(fd)


def ns_id(path: str) -> tuple[int, int]:
    """The (st_dev, st_ino) pair identifying the namespace file at ``path``."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def userns_path_of(pid: int) -> str:
    return f"/proc/{pid}/ns/user"


def netns_path_of(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def owner_userns_id(ns_fd: int) -> tuple[int, int]:
    """The (st_dev, st_ino) of the user namespace owning the namespace open at ``ns_fd``."""
    import fcntl

    owner = fcntl.ioctl(ns_fd, NS_GET_USERNS)
    try:
        st = os.fstat(owner)
    finally:
        os.close(owner)
    return st.st_dev, st.st_ino


def userns_differs(userns_path: str) -> bool:
    """Whether the user namespace at ``userns_path`` is not the one we are in."""
    return ns_id(userns_path) != ns_id("/proc/self/ns/user")


def pid_userns_differs(pid: int) -> bool:
    """Whether process ``pid`` lives in another user namespace than ours."""
    return userns_differs(userns_path_of(pid))


def forked_child_signal_hygiene() -> None:
    """Call first thing in a forked child that will run Python code for a while.

    The parent's event loop may own signal handlers that write into its
    wakeup pipe (asyncio's ``set_wakeup_fd``, libuv's own pipe): a signal
    caught in the child would wake the *parent's* loop as if the parent had
    received it. Put every handled signal back to its default action (a
    SIGINT/SIGTERM then ends the child as it would end the exec'd command);
    ignored signals stay ignored (exec keeps them; callers reset SIGPIPE).
    """
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.getsignal(sig)
        # SIGCHLD: libuv installs its handler behind Python's back (getsignal says SIG_DFL).
        if handler is signal.SIG_IGN or (handler is signal.SIG_DFL and sig != signal.SIGCHLD):
            continue  # resetting the ~60 untouched signals would cost a millisecond
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
