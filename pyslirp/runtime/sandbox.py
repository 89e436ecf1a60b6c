"""``--enable-sandbox``: a minimal root, no capabilities but one, no new privileges.

Theory of operation
-------------------
This does what slirp4netns 1.2's ``sandbox.c`` does, with ctypes, once the
TAP and the API socket are open and before the first frame is served:

1. ``unshare(CLONE_NEWNS)`` and make every mount private, so nothing below
   propagates back to the host's mount namespace.
2. Mount a tiny tmpfs on ``/tmp`` (of the new namespace only), create
   ``etc``, ``run`` and ``old`` in it and bind ``/etc`` and ``/run`` there
   recursively, then remount those binds read-only, ``nosuid``, ``nodev``,
   ``noexec``. ``/etc`` is what the resolv.conf watcher reads (and
   ``/etc/resolv.conf`` may be a symlink into ``/run``).
3. ``pivot_root`` into the tmpfs, detach the old root (``umount2(MNT_DETACH)``)
   and remove its mount point, then remount the new root read-only.
4. ``PR_SET_NO_NEW_PRIVS``; clear the ambient set; drop every capability
   from the bounding set except ``CAP_NET_BIND_SERVICE`` (forwarded ports
   below 1024 still bind); ``capset`` effective, permitted and inheritable
   to ``CAP_NET_BIND_SERVICE`` alone.

As slirp4netns does, a caller that is not root on the host first joins the
target's user namespace (where it is root with every capability) so step 1
is permitted; the capabilities dropped in step 4 are then those. A QEMU back
end has no target user namespace: a non-root one makes its own (our uid and
gid mapped to 0, nothing else) for the same purpose.

Python-specific: once the old root is gone, the interpreter cannot import
anything any more (the venv and the standard library are not in the new
root). The caller imports the engine and builds its server first; then
:func:`preload` imports what serving still loads on first use (a short,
explicit list: codecs, traceback formatting, asyncio's executor, the
seccomp module; the front end adds its own, e.g. the API socket's JSON) and
must run before :func:`create_sandbox`; ``serve_namespace`` calls both
through :func:`apply`. Walking every module of our packages instead cost
~8 ms of each start (the CNI engine's and ``pyslirp run``'s modules
included), which podman waits for: the ready byte comes after the sandbox.

What it deliberately does not do: no seccomp here (``seccomp.py``), no
cgroups or rlimits, no new user or PID namespace (slirp4netns has none).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib
import logging
import os

from pyslirp.runtime import netns
from pyslirp.runtime.spec import Hardening

log = logging.getLogger("pyslirp")

# <linux/capability.h>
CAP_NET_BIND_SERVICE = 10
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# <linux/prctl.h>
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_NO_NEW_PRIVS = 38
# <sys/mount.h>
MNT_DETACH = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

#: The directories bound (read-only) into the new root, as slirp4netns does.
KEPT_DIRS = ("etc", "run")
#: Where the tmpfs goes in the new mount namespace; slirp4netns uses /tmp too.
_STAGE = "/tmp"

# dlopen(NULL): the libc already mapped into the interpreter (find_library would
# run ldconfig in a subprocess).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.restype = ctypes.c_int


class SandboxError(OSError):
    """A sandbox step failed; the message names the step (as slirp4netns's do)."""


def _fail(what: str) -> None:
    err = ctypes.get_errno()
    raise SandboxError(err, f"sandbox: {what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None, what: str) -> None:
    try:
        netns.mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise SandboxError(exc.errno, f"sandbox: {what}: {os.strerror(exc.errno or 0)}") \
            from None


def _bind_read_only(source: str, target: str) -> None:
    flags = netns.MS_NOSUID | netns.MS_NODEV | netns.MS_NOEXEC
    _mount(source, target, None, netns.MS_BIND | netns.MS_REC | flags, None,
           f"cannot bind mount {source} to {target}")
    _mount(None, target, None, netns.MS_SLAVE | netns.MS_REC, None,
           f"cannot make mount propagation slave {target}")
    _mount(source, target, None, netns.MS_REMOUNT | netns.MS_BIND | netns.MS_RDONLY | flags,
           None, f"cannot remount ro {target}")


def enter_user_namespace(userns_path: str) -> None:
    """Join the user namespace at ``userns_path`` and become its root (non-root callers).

    The kernel allows this only in a single-threaded process; pyslirp has
    no threads at this point (the TAP was opened by a forked helper).
    """
    fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.setns(fd, netns.CLONE_NEWUSER)
    except OSError as exc:
        raise SandboxError(exc.errno, f"sandbox: cannot join the user namespace {userns_path}: "
                                      f"{os.strerror(exc.errno or 0)}") from None
    finally:
        os.close(fd)
    try:
        os.setegid(0)
        os.seteuid(0)
    except OSError as exc:
        raise SandboxError(exc.errno, f"sandbox: cannot become root in {userns_path}: "
                                      f"{exc.strerror}") from None


def new_user_namespace() -> None:
    """Move into a new user namespace owned by us and become its root (non-root callers).

    For a front end that has no target user namespace to join (a QEMU back
    end): the mount namespace below then belongs to it. Our uid and gid map
    to 0 and nothing else exists in there, so files keep their owners.
    """
    uid, gid = os.geteuid(), os.getegid()
    try:
        netns.unshare(netns.CLONE_NEWUSER)
    except OSError as exc:
        raise SandboxError(exc.errno, "sandbox: cannot unshare new user namespace: "
                                      f"{os.strerror(exc.errno or 0)}") from None
    # setgroups must be denied before an unprivileged process may write gid_map.
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise SandboxError(exc.errno, f"sandbox: cannot write {path}: "
                                          f"{exc.strerror}") from None


def _pivot_root(new_root: str, put_old: str) -> None:
    machine = os.uname().machine  # what platform.machine() says, without importing platform
    nr = _SYS_PIVOT_ROOT.get(machine)
    if nr is None:
        raise SandboxError(errno.ENOSYS, f"sandbox: pivot_root unknown on {machine}")
    if _libc.syscall(nr, os.fsencode(new_root), os.fsencode(put_old)) != 0:
        _fail(f"cannot pivot_root to {_STAGE}")


def create_mount_sandbox() -> None:
    """Steps 1-3: a new mount namespace whose root holds only read-only /etc and /run."""
    try:
        netns.unshare(netns.CLONE_NEWNS)
    except OSError as exc:
        raise SandboxError(exc.errno, "sandbox: cannot unshare new mount namespace: "
                                      f"{os.strerror(exc.errno or 0)}") from None
    _mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE, None, "cannot remount / private")
    _mount("tmpfs", _STAGE, "tmpfs", netns.MS_NOSUID | netns.MS_NODEV | netns.MS_NOEXEC,
           "size=4k,mode=755", f"cannot mount tmpfs on {_STAGE}")
    for name in (*KEPT_DIRS, "old"):
        os.mkdir(os.path.join(_STAGE, name), 0o755)
    for name in KEPT_DIRS:
        _bind_read_only(f"/{name}", os.path.join(_STAGE, name))
    os.chdir(_STAGE)
    _pivot_root(".", "old")
    os.chdir("/")
    if _libc.umount2(b"/old", MNT_DETACH) != 0:
        _fail("cannot umount /old")
    os.rmdir("/old")
    # slirp4netns ignores a failure here too: the root is a throwaway tmpfs either way.
    with contextlib.suppress(SandboxError):
        _mount("tmpfs", "/", "tmpfs", netns.MS_REMOUNT | netns.MS_RDONLY, None,
               "cannot remount / read-only")


def drop_privileges() -> None:
    """Step 4: no new privileges, and CAP_NET_BIND_SERVICE as the only capability left."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _fail("prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        _fail("prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    cap = 0
    while True:
        if cap != CAP_NET_BIND_SERVICE and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break  # past the last capability this kernel knows
            _fail(f"prctl(PR_CAPBSET_DROP, {cap})")
        cap += 1
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    bit = 1 << CAP_NET_BIND_SERVICE
    data[0].effective = data[0].permitted = data[0].inheritable = bit
    if _libc.capset(ctypes.byref(header), data) != 0:
        _fail("capset")


#: What serving may import on first use, once the engine is loaded: every import inside a
#: function (and codec look-up) on the serving path of the runtime, stack and wire, with the
#: standard-library modules those pull in. A module missing here fails only when first
#: used in the sandbox ("No module named ..."): tests/e2e/test_hardening.py serves TCP,
#: UDP, DNS, forwards and the whole API (podman's flags) in the sandbox and looks for that.
_SERVING_LAZY = (
    "encodings.idna",  # wire/dhcp.py: search domains (a codec look-up imports it)
    "encodings.ascii", "encodings.latin_1",
    "traceback", "linecache", "tokenize",  # a logged exception's traceback
    "concurrent.futures", "concurrent.futures.thread",  # asyncio's default executor
    "fcntl", "select", "selectors", "signal", "errno", "ipaddress", "struct", "random",
    "asyncio", "uvloop",
    "pyslirp.runtime.seccomp",  # install_seccomp, after the sandbox
)


def preload(front_end: tuple[str, ...] = ()) -> list[str]:
    """Import everything serving may need later; returns the names that failed (logged).

    ``front_end``: the calling front end's modules (``Hardening.preload``, e.g. the API
    socket's). The engine itself (runtime, stack, wire) is imported already: the caller
    built its server before hardening. Importing a loaded module is a dictionary look-up,
    so only what is still missing costs (pkgutil's walk over every module of our
    packages, the CNI engine's and ``pyslirp run``'s included, cost ~8 ms per start).
    """
    failed: list[str] = []
    for name in (*_SERVING_LAZY, *front_end):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed.append(name)
            log.debug("sandbox: cannot preload %s: %s", name, exc)
    return failed


def create_sandbox(userns_path: str | None = None, *, own_userns: bool = False) -> None:
    """Everything ``--enable-sandbox`` does, in slirp4netns's order (irreversible).

    Call :func:`preload` first: nothing can be imported afterwards.

    ``userns_path`` is the target's user namespace, joined first when we are
    not root (slirp4netns does the same); ``own_userns`` instead makes a new
    one for a non-root caller that has no target (a QEMU back end). Root
    needs neither and ignores both.
    """
    if os.geteuid() != 0:
        if userns_path is not None:
            enter_user_namespace(userns_path)
        elif own_userns:
            new_user_namespace()
    create_mount_sandbox()
    drop_privileges()


def can_create_sandbox() -> bool:
    """Whether :func:`create_sandbox` (``own_userns=True``) can get its namespaces here.

    A forked child tries the unshares and exits; nothing of ours changes. A
    container runtime's seccomp profile, or a kernel with unprivileged user
    namespaces off, says no to a non-root caller.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked child
        code = 1
        try:
            if os.geteuid() != 0:
                netns.unshare(netns.CLONE_NEWUSER)
            netns.unshare(netns.CLONE_NEWNS)
            code = 0
        except BaseException:  # noqa: BLE001, S110 - any failure is the answer "no"
            pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """The ``Cap*`` masks of ``/proc/PID/status`` (CapInh, CapPrm, CapEff, CapBnd, CapAmb)."""
    caps: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Cap"):
                key, _, value = line.partition(":")
                caps[key] = int(value.strip(), 16)
    return caps


def no_new_privs(pid: int | str = "self") -> bool:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("NoNewPrivs:"):
                return line.split()[1] == "1"
    return False  # pragma: no cover - every kernel since 4.10 reports it


def apply(hardening: Hardening, *, own_userns: bool = False) -> bool:
    """``--enable-sandbox`` then ``--enable-seccomp`` as asked; False (logged) on failure.

    Call once the TAP (or the QEMU socket) and the API socket are open and
    before serving; the process cannot open new files outside /etc and /run
    afterwards, nor exec. ``own_userns``: see :func:`create_sandbox`.
    """
    sandbox, filtered = hardening.sandbox, hardening.seccomp
    if not (sandbox or filtered):
        return True
    if sandbox:  # (the filter alone leaves imports working: open, read, mmap stay allowed)
        failed = preload(hardening.preload)
        if failed:
            log.warning("sandbox: could not preload %s", ", ".join(failed))
        try:
            create_sandbox(None if own_userns else hardening.userns_path, own_userns=own_userns)
        except SandboxError as exc:
            log.error("%s", exc.strerror)  # the whole message, errno text included
            return False
        except OSError as exc:  # mkdir, chdir, rmdir: errors that name their path
            log.error("sandbox: %s", exc)
            return False
        log.info("sandbox: new mount namespace with read-only /etc and /run; "
                 "capabilities: CAP_NET_BIND_SERVICE only; no new privileges")
    return install_seccomp() if filtered else True


def install_seccomp(names: tuple[str, ...] | None = None) -> bool:
    """Load the seccomp filter blocking ``names`` (default: all of ``seccomp.BLOCKED``).

    Logs what it blocked, or the one-line reason it could not (then False).
    """
    from pyslirp.runtime import seccomp

    try:
        info = seccomp.install(names=seccomp.BLOCKED if names is None else names)
    except seccomp.SeccompError as exc:
        log.error("%s", exc.strerror)
        return False
    log.info("seccomp (%s, %s): the following syscalls will be blocked by seccomp: %s",
             info.backend, "kill process" if info.kill_process else "kill thread",
             " ".join(info.names))
    return True
