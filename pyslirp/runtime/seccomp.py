"""``--enable-seccomp``: a syscall filter that kills pyslirp if it ever tries to escape.

Theory of operation
-------------------
slirp4netns 1.2's ``--enable-seccomp`` loads an allow-by-default seccomp
filter (seccomp(2), ``SECCOMP_MODE_FILTER``) that kills the process on the
system calls a compromised network stack would use to break out or to reach
other processes: ``execve``/``execveat``, ``ptrace``, ``process_vm_readv``/
``writev``, ``open_by_handle_at``/``name_to_handle_at``, ``prctl``,
``mount``/``umount``/``umount2``, ``setns`` and ``unshare``. pyslirp blocks
the same calls and, because the issue asks for "module loading" too and
they are as useless to a running stack, ``init_module``/``finit_module``/
``delete_module``, ``pivot_root``, ``kexec_load``/``kexec_file_load`` and
the new mount API (``open_tree``, ``move_mount``, ``fsopen``, ``fsconfig``,
``fsmount``, ``fspick``, ``mount_setattr``). ``open``/``openat`` stay
allowed, as in slirp4netns: the resolv.conf watcher re-reads
``/etc/resolv.conf`` for as long as pyslirp runs.

The CNI engine gets the same filter minus ``setns`` and ``prctl``
(:data:`ENGINE_BLOCKED`): it must fork helpers that join the namespaces of
containers created after it started, and they inherit its filter.

The action is ``SECCOMP_RET_KILL_PROCESS`` (the whole process dies with
SIGSYS, even if another thread made the call) where the kernel has it
(4.14+), else ``SECCOMP_RET_KILL_THREAD``. The filter is installed with
``SECCOMP_FILTER_FLAG_TSYNC`` so every thread of the process is covered,
after ``PR_SET_NO_NEW_PRIVS`` (which an unprivileged caller needs anyway,
and which libseccomp sets by default too).

Two ways to build the same filter:

* **libseccomp** (``libseccomp.so.2``, through ctypes) when the library is
  installed, exactly as slirp4netns does: the native architecture plus the
  compat ones slirp4netns adds (x86 and x32 on x86_64, arm on aarch64).
  ``-v`` then reports its version, as slirp4netns's ``libseccomp:`` line.
* **Hand-built classic BPF** otherwise: check ``seccomp_data.arch`` first
  (x86_64 with its x32 numbers, i386, aarch64, arm; any other architecture
  is killed, as libseccomp does for architectures missing from a filter),
  then compare ``seccomp_data.nr`` against the table of that architecture.
  The tables are checked against libseccomp's own in the tests.

What it deliberately does not do: no allow-list (as slirp4netns: finding
every call CPython, uvloop and glibc may make is not practical), no
argument filtering, no logging action. Everything Python would need to
load after the filter is on (modules, ``ctypes.util`` helpers that run
``ldconfig``) must be loaded before: :func:`install` only uses objects
prepared when this module was imported.
"""

from __future__ import annotations

import ctypes
import errno
import os

# <linux/audit.h>
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028
#: libseccomp's token for x32 (not an AUDIT_ARCH: x32 runs as x86_64 with this bit in nr).
SCMP_ARCH_X32 = 0x4000003E
X32_SYSCALL_BIT = 0x40000000

# <linux/seccomp.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ALLOW = 0x7FFF0000

# <linux/prctl.h>
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21

# <linux/filter.h>: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_RET_K = 0x06
# struct seccomp_data: int nr; __u32 arch; ...
_OFF_NR = 0
_OFF_ARCH = 4

#: The calls slirp4netns 1.2's seccompfilter.c blocks, in its order.
SLIRP4NETNS_BLOCKED = (
    "execve", "execveat", "open_by_handle_at", "ptrace", "prctl", "process_vm_readv",
    "process_vm_writev", "mount", "name_to_handle_at", "setns", "umount", "umount2", "unshare",
)
#: What pyslirp blocks in addition (module loading, root switching, kexec, new mount API).
EXTRA_BLOCKED = (
    "init_module", "finit_module", "delete_module", "pivot_root", "kexec_load",
    "kexec_file_load", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick",
    "mount_setattr",
)
BLOCKED = SLIRP4NETNS_BLOCKED + EXTRA_BLOCKED
#: What a process keeps when it forks helpers into other namespaces (the CNI engine):
#: the helpers inherit the filter and must still setns(2), and prctl(2) (they make
#: themselves non-dumpable before joining, ``runtime/tap.py``).
NAMESPACE_HELPERS_NEED = ("setns", "prctl")
#: The CNI engine's filter: everything else in :data:`BLOCKED` (exec, ptrace,
#: process_vm_*, mount and the new mount API, unshare, handles, modules, kexec).
ENGINE_BLOCKED = tuple(n for n in BLOCKED if n not in NAMESPACE_HELPERS_NEED)

_NEW_MOUNT_API = {"open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
                  "fsmount": 432, "fspick": 433, "mount_setattr": 442}

#: Syscall numbers per architecture (a name missing from a table does not exist there:
#: only i386 still has the one-argument ``umount``; i386 has no ``kexec_file_load``).
SYSCALLS: dict[int, dict[str, int]] = {
    AUDIT_ARCH_X86_64: {
        "execve": 59, "execveat": 322, "open_by_handle_at": 304, "ptrace": 101, "prctl": 157,
        "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165,
        "name_to_handle_at": 303, "setns": 308, "umount2": 166, "unshare": 272,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "pivot_root": 155,
        "kexec_load": 246, "kexec_file_load": 320, **_NEW_MOUNT_API,
    },
    AUDIT_ARCH_I386: {
        "execve": 11, "execveat": 358, "open_by_handle_at": 342, "ptrace": 26, "prctl": 172,
        "process_vm_readv": 347, "process_vm_writev": 348, "mount": 21,
        "name_to_handle_at": 341, "setns": 346, "umount": 22, "umount2": 52, "unshare": 310,
        "init_module": 128, "finit_module": 350, "delete_module": 129, "pivot_root": 217,
        "kexec_load": 283, **_NEW_MOUNT_API,
    },
    AUDIT_ARCH_AARCH64: {
        "execve": 221, "execveat": 281, "open_by_handle_at": 265, "ptrace": 117, "prctl": 167,
        "process_vm_readv": 270, "process_vm_writev": 271, "mount": 40,
        "name_to_handle_at": 264, "setns": 268, "umount2": 39, "unshare": 97,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "pivot_root": 41,
        "kexec_load": 104, "kexec_file_load": 294, **_NEW_MOUNT_API,
    },
    AUDIT_ARCH_ARM: {
        "execve": 11, "execveat": 387, "open_by_handle_at": 371, "ptrace": 26, "prctl": 172,
        "process_vm_readv": 376, "process_vm_writev": 377, "mount": 21,
        "name_to_handle_at": 370, "setns": 375, "umount2": 52, "unshare": 337,
        "init_module": 128, "finit_module": 379, "delete_module": 129, "pivot_root": 218,
        "kexec_load": 347, "kexec_file_load": 401, **_NEW_MOUNT_API,
    },
}
# x32 (x86_64 kernel, ILP32 ABI): the x86_64 numbers with X32_SYSCALL_BIT, except for the
# calls whose arguments differ, which x32 gets at 512 and up.
_X32_OWN = {"execve": 520, "ptrace": 521, "process_vm_readv": 539, "process_vm_writev": 540,
            "execveat": 545, "kexec_load": 528}
SYSCALLS[SCMP_ARCH_X32] = {
    name: X32_SYSCALL_BIT | _X32_OWN.get(name, nr)
    for name, nr in SYSCALLS[AUDIT_ARCH_X86_64].items()
}

#: The architectures a filter covers on each machine: the native one first, then the compat
#: ones a process of this machine can enter the kernel with (slirp4netns's seccomparch.h).
_MACHINE_ARCHES = {
    "x86_64": (AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, SCMP_ARCH_X32),
    "aarch64": (AUDIT_ARCH_AARCH64, AUDIT_ARCH_ARM),
}
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
#: platform.machine()'s answer, without importing platform (start-up time).
_MACHINE = os.uname().machine


class SeccompError(OSError):
    """The filter could not be built or loaded (the message says which step failed)."""


def native_arches() -> tuple[int, ...]:
    """The AUDIT_ARCH values a filter must handle on this machine (native first)."""
    arches = _MACHINE_ARCHES.get(_MACHINE)
    if arches is None:
        raise SeccompError(errno.ENOSYS, f"seccomp: no syscall table for {_MACHINE}")
    return arches


# --- the C libraries, loaded now so nothing needs loading once the filter is on ----------

# dlopen(NULL): the libc already mapped into the interpreter (find_library would
# run ldconfig in a subprocess).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _ScmpVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def _load_libseccomp() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        # Only now: find_library runs ``ldconfig -p`` in a subprocess (start-up cost).
        from ctypes.util import find_library

        name = find_library("seccomp")
        if name is None:
            return None
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:  # pragma: no cover - found by ldconfig yet not loadable
            return None
    try:
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.restype = None
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_arch_add.restype = ctypes.c_int
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_attr_set.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
        lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
        lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
        # seccomp_rule_add is variadic; with arg_cnt 0 no variadic argument follows.
        lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                         ctypes.c_uint]
        lib.seccomp_rule_add.restype = ctypes.c_int
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_load.restype = ctypes.c_int
        lib.seccomp_version.restype = ctypes.POINTER(_ScmpVersion)
    except AttributeError:  # pragma: no cover - a libseccomp older than 2.3
        return None
    return lib


_libseccomp = _load_libseccomp()


def libseccomp_version() -> str | None:
    """``MAJOR.MINOR.MICRO`` of the libseccomp pyslirp would use, or None without one."""
    if _libseccomp is None:
        return None
    v = _libseccomp.seccomp_version()
    if not v:
        return None
    return f"{v.contents.major}.{v.contents.minor}.{v.contents.micro}"


def resolve_with_libseccomp(arch: int, name: str) -> int | None:
    """libseccomp's number for ``name`` on ``arch`` (None if it has none), for cross-checks."""
    if _libseccomp is None:
        return None
    nr: int = _libseccomp.seccomp_syscall_resolve_name_arch(arch, name.encode())
    return nr if nr >= 0 else None


# --- the hand-built filter ------------------------------------------------------------

def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return code, jt, jf, k


def build_bpf(arches: tuple[int, ...], names: tuple[str, ...] = BLOCKED,
              kill: int = SECCOMP_RET_KILL_PROCESS) -> list[tuple[int, int, int, int]]:
    """The classic-BPF program as (code, jt, jf, k) tuples.

    Layout: load ``arch``; one JEQ per architecture jumping to its block;
    anything else is killed. A block loads ``nr``, compares it with each
    blocked number (JEQ to the block's final kill) and otherwise allows.
    x32 shares the x86_64 block (same AUDIT_ARCH; its numbers carry bit 30).
    """
    blocks: list[list[tuple[int, int, int, int]]] = []
    dispatch: list[int] = []
    for arch in arches:
        if arch == SCMP_ARCH_X32:
            continue  # folded into the x86_64 block below
        numbers = [SYSCALLS[arch][n] for n in names if n in SYSCALLS[arch]]
        if arch == AUDIT_ARCH_X86_64 and SCMP_ARCH_X32 in arches:
            numbers += [SYSCALLS[SCMP_ARCH_X32][n] for n in names
                        if n in SYSCALLS[SCMP_ARCH_X32]]
        numbers = sorted(set(numbers))
        block = [_insn(_LD_W_ABS, _OFF_NR)]
        for i, nr in enumerate(numbers):
            # jump over the remaining compares and the ALLOW to the KILL at the end
            block.append(_insn(_JEQ_K, nr, jt=len(numbers) - i))
        block.append(_insn(_RET_K, SECCOMP_RET_ALLOW))
        block.append(_insn(_RET_K, kill))
        blocks.append(block)
        dispatch.append(arch)
    prog = [_insn(_LD_W_ABS, _OFF_ARCH)]
    # After the JEQs comes one "kill: unknown arch", then the blocks in order.
    offset = len(dispatch) - 1 + 1  # from the instruction after JEQ i to the first block
    for i, arch in enumerate(dispatch):
        target = offset - i + sum(len(b) for b in blocks[:i])
        if target > 255:  # pragma: no cover - the tables are far smaller
            raise SeccompError(errno.E2BIG, "seccomp: filter too large for a BPF jump")
        prog.append(_insn(_JEQ_K, arch, jt=target))
    prog.append(_insn(_RET_K, kill))
    for block in blocks:
        prog.extend(block)
    return prog


def _raise(what: str) -> None:
    err = ctypes.get_errno()
    raise SeccompError(err, f"seccomp: {what}: {os.strerror(err)}")


def kill_action() -> int:
    """KILL_PROCESS where the kernel supports it, else KILL_THREAD."""
    nr = _SYS_SECCOMP.get(_MACHINE)
    if nr is not None:
        action = ctypes.c_uint32(SECCOMP_RET_KILL_PROCESS)
        if _libc.syscall(nr, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action)) == 0:
            return SECCOMP_RET_KILL_PROCESS
    return SECCOMP_RET_KILL_THREAD


def _set_no_new_privs() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        _raise("prctl(PR_SET_NO_NEW_PRIVS)")


def _load_bpf(program: list[tuple[int, int, int, int]]) -> None:
    insns = (_SockFilter * len(program))(*[_SockFilter(c, jt, jf, k)
                                           for c, jt, jf, k in program])
    prog = _SockFprog(len(program), insns)
    _set_no_new_privs()
    nr = _SYS_SECCOMP.get(_MACHINE)
    if nr is not None and _libc.syscall(nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                                        ctypes.byref(prog)) == 0:
        return
    # Pre-3.17 kernels have no seccomp(2); prctl covers only the calling thread.
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        _raise("loading the filter")


# --- libseccomp ---------------------------------------------------------------------

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_CTL_TSYNC = 4


def _load_libseccomp_filter(arches: tuple[int, ...], names: tuple[str, ...],
                            kill: int) -> None:
    lib = _libseccomp
    assert lib is not None
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise SeccompError(errno.ENOMEM, "seccomp: seccomp_init failed")
    try:
        for arch in arches[1:]:
            rc = lib.seccomp_arch_add(ctx, arch)
            if rc < 0 and -rc not in (errno.EEXIST, errno.EDOM):
                raise SeccompError(-rc, f"seccomp: cannot add arch {arch:#x}: "
                                        f"{os.strerror(-rc)}")
        for name in names:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            # libseccomp knows every name here; a pseudo-syscall number (negative) for
            # calls the native arch lacks (umount) still applies to the compat arches.
            rc = lib.seccomp_rule_add(ctx, kill, nr, 0)
            if rc < 0:
                raise SeccompError(-rc, f"seccomp: cannot block {name}: {os.strerror(-rc)}")
        rc = lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp: cannot request TSYNC: {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SeccompError(-rc, f"seccomp: seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


# --- the public entry point -------------------------------------------------------

class FilterInfo:
    """What :func:`install` loaded, for the log line.

    A plain class: a dataclass costs ~0.5 ms to build, on podman's start path
    (this module loads before the ready byte).
    """

    __slots__ = ("backend", "names", "kill_process")

    def __init__(self, backend: str, names: tuple[str, ...], kill_process: bool) -> None:
        self.backend = backend
        self.names = names
        self.kill_process = kill_process

    def __repr__(self) -> str:
        return (f"FilterInfo(backend={self.backend!r}, names={self.names!r}, "
                f"kill_process={self.kill_process!r})")


def install(use_libseccomp: bool | None = None, names: tuple[str, ...] = BLOCKED) -> FilterInfo:
    """Load the filter into this process (all threads); irreversible.

    ``use_libseccomp`` None picks libseccomp when it is installed, True
    insists on it, False always builds the BPF program by hand.
    """
    arches = native_arches()
    kill = kill_action()
    lib = use_libseccomp if use_libseccomp is not None else _libseccomp is not None
    if lib:
        if _libseccomp is None:
            raise SeccompError(errno.ENOENT, "seccomp: libseccomp is not installed")
        _load_libseccomp_filter(arches, names, kill)
        backend = f"libseccomp {libseccomp_version()}"
    else:
        _load_bpf(build_bpf(arches, names, kill))
        backend = "built-in BPF"
    return FilterInfo(backend, names, kill == SECCOMP_RET_KILL_PROCESS)


def seccomp_mode(pid: int | str = "self") -> int:
    """The ``Seccomp:`` field of ``/proc/PID/status`` (0 none, 1 strict, 2 filter)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0  # pragma: no cover - every Linux since 3.8 has the field


__all__ = ["BLOCKED", "ENGINE_BLOCKED", "SLIRP4NETNS_BLOCKED", "SeccompError", "FilterInfo",
           "install", "build_bpf", "libseccomp_version", "native_arches", "seccomp_mode"]
