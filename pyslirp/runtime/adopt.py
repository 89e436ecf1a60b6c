"""Taking over a host port that the runtime calling us reserved: find its socket, duplicate it.

Theory of operation
-------------------
Rootful podman (4.x, ``enable_port_reservation``, on by default) reserves every
published host port itself: right *after* the CNI ADD it binds (and, for TCP,
listens on) ``hostIP:hostPort`` in its own process, hands the socket to conmon
and closes its copy; conmon holds it for the container's life. Those sockets
are meant to keep the port from being reused while the portmap plugin's
iptables DNAT serves it; nobody ever accepts on them. A plugin that serves the
port from a userspace socket collides with that reservation: whoever binds
second gets EADDRINUSE.

Instead of fighting it, the engine serves the reservation itself. A listening
socket is just a kernel object: :func:`pidfd_getfd` (Linux >= 5.6) gives us
our own descriptor for the very same socket, so connections to the port reach
our ``accept`` while conmon's copy keeps the port reserved. When the engine
closes its descriptor (DEL), the reservation is podman's/conmon's alone again
and disappears with conmon.

Finding it: ``/proc/self/net/{tcp,udp}`` (``tcp6``, ``udp6`` for an IPv6
address) lists the sockets of the engine's network namespace with their
inode; ``/proc/PID/fd/N`` links read ``socket:[INODE]``. A TCP socket counts
when it listens on exactly the address and port (a TCP socket that is only bound does not appear in
``/proc/net/tcp``; :func:`find_holder` then inspects the candidates' socket
descriptors directly when asked to); a UDP socket when it is bound to them and
not connected.

Whose sockets we take (security): only those of the process that ran the
plugin (the runtime: the plugin passes its parent PID along) and of that
process's descendants, as :class:`CallerTree` tracks them by PID *and* start
time, so a recycled PID is never trusted; a process that was seen as a
descendant stays eligible after it was re-parented. One more process counts:
the container's own monitor. podman hands the reservation to conmon, and
conmon daemonizes at once (a double fork: the middle process exits within
milliseconds and the monitor is re-parented to init). On a busy machine a
poll of /proc easily misses both podman's copy and the middle process, and
the monitor is then nobody's descendant; so a ``conmon`` whose argv names
the very container being added (``-c CONTAINERID``, which podman passes and
the runtime gave us as ``CNI_CONTAINERID``) and that runs as the caller's
user is a member too. A socket of any other process is never touched: the
forward then fails with the usual "address already in use".

IPv6 reservations (``-p [::1]:8080:80``: podman binds an IPv6-only socket) are
found and taken over the same way; a socket counts when its family is the
address's and it is bound to exactly that address and port.

Not done: SCTP.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import socket
import struct

from pyslirp.procfs import process_start_time

#: pidfd_getfd's number; the same in x86_64's table and in the generic table (aarch64, riscv64).
_SYS_PIDFD_GETFD = {"x86_64": 438, "aarch64": 438, "riscv64": 438}.get(platform.machine(), 438)
_TCP_LISTEN = 0x0A
_TCP_CLOSE = 0x07  # UDP's "bound, not connected" in /proc/net/udp
_NATIVE_U32 = struct.Struct("=I")
_libc = ctypes.CDLL(None, use_errno=True)


class AdoptError(OSError):
    """A matching socket was found but could not be taken over."""


def pidfd_getfd(pid: int, fd: int) -> int:
    """Our own descriptor (close-on-exec) for descriptor ``fd`` of process ``pid``."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return int(new)
    finally:
        os.close(pidfd)


def _parents() -> dict[int, tuple[int, int, str]]:
    """Every live process: pid -> (ppid, start time, command name)."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        close = data.rfind(b")")
        fields = data[close + 2:].split()
        if len(fields) > 19 and fields[0] != b"Z":
            comm = data[data.find(b"(") + 1:close].decode(errors="replace")
            out[int(name)] = (int(fields[1]), int(fields[19]), comm)
    return out


def _euid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[2]) for line in f if line.startswith("Uid:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def is_container_monitor(pid: int, container_id: str, euid: int | None) -> bool:
    """Whether ``pid`` is the conmon of ``container_id``, running with effective uid ``euid``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if not argv or os.path.basename(argv[0]) != b"conmon" or euid is None:
        return False
    cid = container_id.encode()
    named = any(arg in (b"-c", b"--cid") and value == cid
                for arg, value in zip(argv, argv[1:], strict=False))
    return (named or b"--cid=" + cid in argv) and _euid(pid) == euid


class CallerTree:
    """The plugin's caller and its descendants, remembered by (PID, start time)."""

    def __init__(self, pid: int, start: int | None = None,
                 container_id: str | None = None) -> None:
        self.pid = pid
        start = start if start is not None else process_start_time(pid)
        #: pid -> start time of every process ever seen in the tree.
        self.known: dict[int, int] = {pid: start} if start is not None else {}
        #: The container being added: its conmon belongs to the tree (module docstring).
        self.container_id = container_id
        self.euid = _euid(pid)
        #: (pid, start time) of every conmon of the container seen so far.
        self.monitors: set[tuple[int, int]] = set()

    @property
    def monitor_seen(self) -> bool:
        """Whether the container's conmon has been seen: podman binds the reservations
        before it starts conmon (they are conmon's inherited descriptors), so from then
        on a reservation that is not there is not coming."""
        return bool(self.monitors)

    def members(self) -> list[int]:
        """The live processes that belong (or belonged) to the tree, caller first."""
        procs = _parents()
        if self.pid in self.known and procs.get(self.pid, (0, -1))[1] == self.known[self.pid]:
            children: dict[int, list[int]] = {}
            for pid, (ppid, _start, _comm) in procs.items():
                children.setdefault(ppid, []).append(pid)
            todo = [self.pid]
            while todo:
                for child in children.get(todo.pop(), ()):
                    if child not in self.known or self.known[child] != procs[child][1]:
                        self.known[child] = procs[child][1]
                    todo.append(child)
        if self.container_id is not None:
            for pid, (_ppid, start, comm) in procs.items():
                if comm == "conmon" and (pid, start) not in self.monitors and \
                        is_container_monitor(pid, self.container_id, self.euid):
                    self.monitors.add((pid, start))
                    self.known[pid] = start
        live = [pid for pid, start in self.known.items()
                if pid in procs and procs[pid][1] == start]
        for pid in [p for p in self.known if p not in live]:
            del self.known[pid]  # gone: its PID may be reused by a stranger
        return sorted(live, key=lambda p: p != self.pid)


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _hex_addr(addr: str, port: int) -> str:
    """``addr:port`` as /proc/net/{tcp,udp}{,6} spell a local address: the address's
    32-bit words, each as the native-endian number it is in memory."""
    packed = socket.inet_pton(_family(addr), addr)
    words = (_NATIVE_U32.unpack_from(packed, i)[0] for i in range(0, len(packed), 4))
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def socket_inodes(proto: str, addr: str, port: int, net_dir: str = "/proc/self/net") -> set[int]:
    """Inodes of the sockets bound to exactly ``addr:port`` (TCP: listening; UDP: unconnected)."""
    want = _hex_addr(addr, port)
    state = _TCP_LISTEN if proto == "tcp" else _TCP_CLOSE
    table = proto + ("6" if _family(addr) == socket.AF_INET6 else "")
    found: set[int] = set()
    with open(os.path.join(net_dir, table)) as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) > 9 and fields[1] == want and int(fields[3], 16) == state:
                found.add(int(fields[9]))
    return found


def _socket_fds(pid: int) -> list[tuple[int, int]]:
    """(fd, inode) of every socket descriptor of ``pid``."""
    out: list[tuple[int, int]] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                out.append((int(name), int(target[8:-1])))
    return out


def _matches(sock: socket.socket, proto: str, addr: str, port: int) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    family = _family(addr)
    try:
        if sock.family != family or sock.type != kind:
            return False
        bound = sock.getsockname()  # IPv6: (host, port, flowinfo, scope id)
        return bool(bound[1] == port and socket.inet_pton(family, bound[0])
                    == socket.inet_pton(family, addr))
    except OSError:
        return False


def find_holder(proto: str, addr: str, port: int, tree: CallerTree,
                probe_unlisted: bool = False) -> tuple[int, int] | None:
    """(pid, fd) of a tree member's socket bound to exactly ``addr:port``, or None.

    ``probe_unlisted``: for TCP, also look at the members' sockets that no
    /proc/net table lists (bound, not listening) by duplicating each and
    asking it its address; the duplicates are closed at once.
    """
    inodes = socket_inodes(proto, addr, port)
    members = tree.members()
    for pid in members:
        for fd, inode in _socket_fds(pid):
            if inode in inodes:
                return pid, fd
    if not (probe_unlisted and proto == "tcp"):
        return None
    listed = _listed_inodes()
    for pid in members:
        for fd, inode in _socket_fds(pid):
            if inode in listed:
                continue
            try:
                dup = socket.socket(fileno=pidfd_getfd(pid, fd))
            except OSError:
                continue
            with dup:  # closing our duplicate leaves the member's descriptor alone
                if _matches(dup, proto, addr, port):
                    return pid, fd
    return None


def _listed_inodes() -> set[int]:
    """Inodes of every socket /proc/self/net lists (TCP, UDP, raw, unix, netlink)."""
    found: set[int] = set()
    for table, column in (("tcp", 9), ("udp", 9), ("tcp6", 9), ("udp6", 9), ("raw", 9),
                          ("unix", 6), ("netlink", 8)):
        with contextlib.suppress(OSError), open(f"/proc/self/net/{table}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > column and fields[column].isdigit():
                    found.add(int(fields[column]))
    return found


def adopt(proto: str, addr: str, port: int, tree: CallerTree,
          probe_unlisted: bool = False) -> socket.socket | None:
    """Our own descriptor for the tree's socket reserving ``proto`` ``addr:port``, ready to serve.

    None if no member of ``tree`` holds one (someone else's socket is never
    taken, see the module docstring). A TCP socket that is only bound is made
    to listen. Raises :class:`AdoptError` if the socket was found but cannot
    be duplicated (the holder exited meanwhile, or we may not: EPERM).
    """
    holder = find_holder(proto, addr, port, tree, probe_unlisted)
    if holder is None:
        return None
    pid, fd = holder
    try:
        sock = socket.socket(fileno=pidfd_getfd(pid, fd))
    except OSError as exc:
        raise AdoptError(exc.errno or errno.EPERM,
                         f"cannot take over {proto} {addr}:{port} from pid {pid}: "
                         f"{exc.strerror or exc}") from None
    # Between the lookup and the duplication the process could have closed fd and
    # reused the number: make sure we got what we looked for.
    if not _matches(sock, proto, addr, port):
        sock.close()
        return None
    if proto == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.listen(128)
    return sock


def caller_reserves_ports(pid: int) -> bool:
    """Whether ``pid`` is a rootful podman, which reserves published host ports after ADD.

    Rootful means: euid 0 in the initial user namespace (rootless podman runs
    the plugins in its own user namespace and leaves host ports alone).
    """
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        with open(f"/proc/{pid}/uid_map") as f:
            uid_map = f.read().split()
    except OSError:
        return False
    euid = _euid(pid)
    return exe == "podman" and euid == 0 and uid_map == ["0", "0", "4294967295"]
