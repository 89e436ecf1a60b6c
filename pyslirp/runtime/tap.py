"""Open (or attach to) a TAP device inside another network namespace.

Theory of operation
-------------------
This is slirp4netns's layout: the TAP must be created *inside* the target's
network namespace, but the packet engine runs in ours. So :func:`open_tap`
forks a short-lived child that

1. opens the namespace files (``/proc/PID/ns/net`` or a path such as
   ``/run/netns/NAME``; the user namespace of PID, or ``--userns-path``),
2. joins the user namespace first when it is not ours (setns(2) on a user
   namespace needs a single-threaded caller, one reason for the fork; the
   other is that we must not move our own process), then the network namespace,
3. opens ``/dev/net/tun`` and issues ``TUNSETIFF`` with
   ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (this attaches to an existing TAP of
   that name, too), ``TUNSETVNETHDRSZ`` 12 and ``TUNSETOFFLOAD`` with
   ``TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`` plus ``TUN_F_USO4 | TUN_F_USO6``
   when the kernel takes them (only together: USO4 alone is EINVAL). Bit 0x80
   is left out on purpose: the kernel accepts it and then fails reads with
   EFAULT at a 12-byte header (docs/architecture.md, "What the hot path is designed around"),
4. optionally sets the MAC and the MTU, and does what ``slirp4netns -c`` does
   (lo up, TAP up, address/prefix, default route via the gateway),
5. hands the fd to the parent with ``SCM_RIGHTS`` over a socketpair, together
   with a small JSON record of what worked, or a one-line error.

Offloads degrade instead of failing: no vnet header (``vnet_hdr=False``, frames
are bare Ethernet) or no offloads (``offload=False``: every frame is at most
MTU-sized and carries complete checksums), and the engine adapts.

Before step 1 the child makes itself non-dumpable (``PR_SET_DUMPABLE`` 0)
and closes every fd but its end of the socketpair and the standard
streams: it is about to live, however briefly, in the target's user
namespace, whose root must not be able to ptrace it or read its
``/proc/PID/fd``, and it has no use for the parent's other fds (in the
CNI engine: other containers' TAPs and sockets).

Design choices
--------------
* The child is kept minimal because the parent may have threads (an event
  loop's executor): after ``fork`` only this module's code runs, nothing
  takes locks another thread could have held, and it always ends in
  ``os._exit`` so no atexit handler or buffered stdio of the parent runs twice.
* ``-c`` configuration uses the same ioctls slirp4netns uses (SIOCSIFFLAGS,
  SIOCSIFMTU, SIOCSIFADDR/SIOCSIFNETMASK, SIOCADDRT) rather than pyroute2:
  importing pyroute2 costs about 0.2 s and 0.9 builds an asyncio loop, both
  bad in a forked child of an event-loop process and at CNI ADD time; the
  ioctls take microseconds and the result (seen with ``ip -j addr/route``) is
  identical.

A static IPv6 address (``ConfigureSpec.address6``, the CNI plugin's, whose
result must name the address): ``accept_ra`` 0 (no SLAAC address or RA route
beside it), ``accept_dad`` 0 (nobody else is on the link, and the address is
usable at once instead of after a second of DAD), then ``SIOCSIFADDR`` on an
IPv6 socket (``struct in6_ifreq``) and ``SIOCADDRT`` (``struct in6_rtmsg``)
for ``::/0`` via ``gateway6``, once the TAP is up.

IPv6 with ``-c`` (``ConfigureSpec.ipv6``): as with slirp4netns, the guest's
kernel configures itself from our router advertisements (SLAAC address,
default route via our link-local address). Before the TAP goes up the child
makes sure the kernel will: ``disable_ipv6`` 0 and ``accept_ra`` 2 when the
namespace forwards (1 ignores RAs then), in ``/proc/sys/net/ipv6/conf/TAP``
(opened after setns, so it is the target's). Values already right are not
written (a rootless namespace may refuse writes it does not need); a kernel
without IPv6 (no such directory) is an error naming it.

Start-up cost: the command line opens the TAP before it imports the engine
(``pyslirp.cli``, "Start-up order"), so this module imports only the
standard library modules a bare interpreter has anyway plus ``socket``,
``ctypes`` and ``ipaddress``: no ``dataclasses``, ``json`` or
``pyslirp.stack`` (tests/startup_imports.json holds the list). The child's
answer is therefore newline-separated text, not JSON: a TAP name cannot
contain whitespace (the kernel refuses it).

What it deliberately does not do: multiqueue TAPs, persisting the device (it
lives as long as the fd unless it existed before), a queueing discipline or queue
length of its own. The guest's
qdisc never holds a frame for the TAP: the tun driver takes every frame into
its ring (``txqueuelen`` slots) without ever stopping the queue and drops what
does not fit there, so a fair qdisc (fq_codel) would see no backlog to be fair
about (measured under a UDP flood, kernel 6.18: 665,000 frames dropped at the
ring, 0 by pfifo_fast, backlog 0; this kernel has no fq_codel either). Flood
frames are shed cheaply once read (:mod:`pyslirp.runtime.device`); what then
holds a download back is its ACKs' wait in the ring behind the flood (1.5-8 ms
measured) against its send window. A longer ring does not help (8,000 slots
dropped fewer frames and the download did worse) and would pin up to
``txqueuelen`` x 64 KB of kernel memory per TAP.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import ipaddress
import os
import signal
import socket
import struct

from pyslirp.runtime import netns
from pyslirp.wire.ethernet import mac_to_str
from pyslirp.wire.netparams import MAX_MTU, MIN_MTU

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs an import at start-up (see the module doc)
    from typing import Any

    from pyslirp.stack.config import NetConfig

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
VNET_HDR_LEN = 12

# <linux/sockios.h>
SIOCADDRT = 0x890B
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
IFF_UP = 0x1
ARPHRD_ETHER = 1
RTF_UP = 0x1
RTF_GATEWAY = 0x2

IFNAMSIZ = 16
_IFREQ_FLAGS = struct.Struct("16sH22x")       # ifr_name, ifr_flags
_IFREQ_INT = struct.Struct("16si20x")         # ifr_name, ifr_mtu
_IFREQ_HWADDR = struct.Struct("16sH6s16x")    # ifr_name, sa_family, sa_data[0:6]
_IFREQ_INADDR = struct.Struct("16sHH4s8x8x")  # ifr_name, sockaddr_in
_SOCKADDR_IN = struct.Struct("HH4s8x")
_IN6_IFREQ = struct.Struct("16sIi")           # ifr6_addr, ifr6_prefixlen, ifr6_ifindex
# struct in6_rtmsg: dst, src, gateway, type, dst_len, src_len, metric, info, flags, ifindex
_IN6_RTMSG = struct.Struct("@16s16s16sIHHILIi")
SIOCGIFINDEX = 0x8933
RTF_UP6 = 0x1
RTF_GATEWAY6 = 0x2

#: How long the parent waits for the child's answer before giving up.
CHILD_TIMEOUT = 30.0


class TapError(OSError):
    """The TAP could not be opened; the message is one line naming the cause."""


class ConfigureSpec:
    """What ``slirp4netns --configure`` sets up on the TAP (immutable).

    A plain class, not a dataclass: see "Start-up cost" in the module doc.
    """

    __slots__ = ("address", "gateway", "ipv6", "address6", "gateway6")
    #: Address and prefix, e.g. ``10.0.2.100/24``.
    address: ipaddress.IPv4Interface
    #: Default route via this address (None: no default route).
    gateway: ipaddress.IPv4Address | None
    #: Let the guest's kernel take IPv6 from our router advertisements (see the module doc).
    ipv6: bool
    #: A static IPv6 address instead (the CNI plugin's, which its result names), and the
    #: default route via ``gateway6``: the kernel then ignores router advertisements.
    address6: ipaddress.IPv6Interface | None
    gateway6: ipaddress.IPv6Address | None

    def __init__(self, address: ipaddress.IPv4Interface,
                 gateway: ipaddress.IPv4Address | None, ipv6: bool = False,
                 address6: ipaddress.IPv6Interface | None = None,
                 gateway6: ipaddress.IPv6Address | None = None) -> None:
        if ipv6 and address6 is not None:
            raise ValueError("ConfigureSpec: SLAAC (ipv6) and a static address6 exclude "
                             "each other")
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "gateway", gateway)
        object.__setattr__(self, "ipv6", ipv6)
        object.__setattr__(self, "address6", address6)
        object.__setattr__(self, "gateway6", gateway6)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"ConfigureSpec is immutable (cannot set {name})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigureSpec):
            return NotImplemented
        return self._fields() == other._fields()

    def _fields(self) -> tuple[object, ...]:
        return (self.address, self.gateway, self.ipv6, self.address6, self.gateway6)

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        static6 = f", address6={self.address6!r}, gateway6={self.gateway6!r}" \
            if self.address6 is not None else ""
        return f"ConfigureSpec({self.address!r}, {self.gateway!r}, ipv6={self.ipv6}{static6})"

    @classmethod
    def for_network(cls, network: ipaddress.IPv4Network, ipv6: bool = False) -> ConfigureSpec:
        """slirp4netns's layout: the TAP at network + 100, the default route via + 2.

        The same addresses as NetConfig.guest_addr / .gateway, without importing the stack.
        """
        base = network.network_address
        return cls(ipaddress.IPv4Interface(f"{base + 100}/{network.prefixlen}"), base + 2,
                   ipv6=ipv6)

    @classmethod
    def from_netconfig(cls, cfg: NetConfig) -> ConfigureSpec:
        addr = ipaddress.IPv4Address(cfg.guest_addr)
        return cls(ipaddress.IPv4Interface(f"{addr}/{cfg.network.prefixlen}"),
                   ipaddress.IPv4Address(cfg.gateway), ipv6=cfg.enable_ipv6)


class TapHandle:
    """An open TAP. ``fd`` is non-blocking and close-on-exec; it is ours to close."""

    __slots__ = ("fd", "name", "vnet_hdr", "offload", "uso", "mac", "mtu")
    fd: int
    name: str
    #: Frames carry a 12-byte virtio-net header (pyslirp.wire.vnet).
    vnet_hdr: bool
    #: CSUM + TSO4 + TSO6 are on: frames may be GSO super-frames with partial checksums.
    offload: bool
    #: UDP segmentation offload (USO4 + USO6) is on as well.
    uso: bool
    #: The TAP's own MAC address (the guest side of the link).
    mac: bytes
    mtu: int

    def __init__(self, fd: int, name: str, vnet_hdr: bool, offload: bool, uso: bool,
                 mac: bytes, mtu: int) -> None:
        self.fd, self.name, self.vnet_hdr, self.offload = fd, name, vnet_hdr, offload
        self.uso, self.mac, self.mtu = uso, mac, mtu

    def __repr__(self) -> str:
        return (f"TapHandle(fd={self.fd}, name={self.name!r}, vnet_hdr={self.vnet_hdr}, "
                f"offload={self.offload}, uso={self.uso}, mac={self.mac.hex(':')}, "
                f"mtu={self.mtu})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TapHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ChildFailure(Exception):
    """Raised inside the child; its text becomes the parent's TapError message."""


# ---------------------------------------------------------------------------- parent side


def open_tap(target: str, netns_type: str = "pid", tapname: str = "tap0",
             userns_path: str | None = None, mtu: int | None = None,
             configure: ConfigureSpec | None = None, mac: bytes | None = None,
             *, vnet_hdr: bool = True, offload: bool = True,
             timeout: float = CHILD_TIMEOUT) -> TapHandle:
    """Open (creating if needed) TAP ``tapname`` in the network namespace of ``target``.

    ``netns_type`` ``"pid"``: ``target`` is a PID and its user namespace is
    joined first when it differs from ours; ``"path"``: ``target`` is a netns
    file such as ``/run/netns/NAME``. ``userns_path`` (either type) names the
    user namespace to join instead. ``mtu`` (if given) is set on the TAP.
    ``vnet_hdr``/``offload`` False skip asking for the header/offloads (the
    handle then reports them off), e.g. to compare against plain frames.
    Raises :class:`TapError` with a one-line message.
    """
    return start_open_tap(target, netns_type, tapname, userns_path, mtu, configure, mac,
                          vnet_hdr=vnet_hdr, offload=offload, timeout=timeout).wait()


class PendingTap:
    """A TAP whose helper process is at work: :meth:`wait` collects it (call it once)."""

    __slots__ = ("_sock", "_pid", "_timeout")

    def __init__(self, sock: socket.socket, pid: int, timeout: float) -> None:
        self._sock = sock
        self._pid = pid
        self._timeout = timeout

    def wait(self) -> TapHandle:
        """The TAP (raises :class:`TapError`); the helper is reaped either way."""
        try:
            return _receive(self._sock, self._pid, self._timeout)
        finally:
            self._sock.close()


def start_open_tap(target: str, netns_type: str = "pid", tapname: str = "tap0",
                   userns_path: str | None = None, mtu: int | None = None,
                   configure: ConfigureSpec | None = None, mac: bytes | None = None,
                   *, vnet_hdr: bool = True, offload: bool = True,
                   timeout: float = CHILD_TIMEOUT) -> PendingTap:
    """:func:`open_tap` in two halves: the helper starts now, :meth:`PendingTap.wait` ends it.

    The caller may work meanwhile (pyslirp.cli imports the engine while the helper
    configures the TAP); ``timeout`` counts from the wait. Bad arguments and a
    missing target raise :class:`TapError` here, before anything is forked.
    """
    netns_path, userns = _resolve_paths(target, netns_type, userns_path)
    if not tapname or len(tapname.encode()) >= IFNAMSIZ or "/" in tapname:
        raise TapError(f"invalid TAP name {tapname!r}")
    if mac is not None and len(mac) != 6:
        raise TapError(f"invalid MAC address {mac!r}: need 6 bytes")
    if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
        raise TapError(f"MTU {mtu} is out of range {MIN_MTU}..{MAX_MTU}")

    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            _child_main(child_sock, netns_path, userns, tapname, mtu, configure, mac,
                        vnet_hdr, offload)
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    return PendingTap(parent_sock, pid, timeout)


def _resolve_paths(target: str, netns_type: str,
                   userns_path: str | None) -> tuple[str, str | None]:
    """The netns file to join and the user namespace file to join first (if any)."""
    userns: str | None
    if netns_type == "pid":
        if not target.isdigit() or int(target) <= 0:
            raise TapError(f"invalid pid {target!r}")
        pid = int(target)
        netns_path = netns.netns_path_of(pid)
        try:
            os.stat(netns_path)
        except FileNotFoundError:
            raise TapError(f"no process with pid {pid}") from None
        except OSError as exc:
            raise TapError(f"cannot inspect process {pid}: {exc.strerror}") from None
        userns = userns_path or netns.userns_path_of(pid)
    elif netns_type == "path":
        netns_path = target
        if not os.path.exists(netns_path):
            raise TapError(f"netns path {netns_path} does not exist")
        userns = userns_path
    else:
        raise TapError(f"invalid netns type {netns_type!r} (expected 'pid' or 'path')")
    if userns is not None and not os.path.exists(userns):
        raise TapError(f"userns path {userns} does not exist")
    return netns_path, userns


def _receive(sock: socket.socket, pid: int, timeout: float) -> TapHandle:
    fds: list[int] = []
    try:
        sock.settimeout(timeout)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 1)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise TapError(f"TAP helper process did not answer within {timeout:g} s") from None
    finally:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped behind our back (SIGCHLD ignored, a reaper thread)
            status = 0
    if not msg:
        for fd in fds:
            os.close(fd)
        raise TapError(f"TAP helper process died without an answer "
                       f"(exit status {os.waitstatus_to_exitcode(status)})")
    kind, _, rest = msg.decode(errors="replace").partition("\n")
    if kind != "ok" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise TapError(rest if kind == "error" else "TAP helper sent no file descriptor")
    fd = fds[0]
    # recv_fds does not ask for MSG_CMSG_CLOEXEC: a spawned command must not inherit the TAP.
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    name, vnet_hdr, offload, uso, mac, mtu = rest.split("\n")
    return TapHandle(fd=fd, name=name, vnet_hdr=vnet_hdr == "1", offload=offload == "1",
                     uso=uso == "1", mac=bytes.fromhex(mac), mtu=int(mtu))


def _encode_reply(name: str, vnet_hdr: bool, offload: bool, uso: bool, mac: bytes,
                  mtu: int) -> bytes:
    """The child's answer: "ok" and the fields, one a line (see _receive)."""
    fields = ["ok", name, *("1" if f else "0" for f in (vnet_hdr, offload, uso)), mac.hex(),
              str(mtu)]
    return "\n".join(fields).encode()


# ---------------------------------------------------------------------------- child side


def _child_main(sock: socket.socket, netns_path: str, userns_path: str | None,
                tapname: str, mtu: int | None, configure: ConfigureSpec | None,
                mac: bytes | None, want_vnet_hdr: bool,
                want_offload: bool) -> None:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        netns.forked_child_signal_hygiene()
        _child_harden(sock)
        fd, reply = _child_open(netns_path, userns_path, tapname, mtu, configure, mac,
                                want_vnet_hdr, want_offload)
        socket.send_fds(sock, [reply], [fd])
        code = 0
    except _ChildFailure as exc:
        _child_report(sock, str(exc))
    except BaseException as exc:  # noqa: BLE001 - anything must become a message
        _child_report(sock, f"TAP helper failed: {type(exc).__name__}: {exc}")
    finally:
        os._exit(code)


def _child_harden(sock: socket.socket) -> None:  # pragma: no cover - forked child
    """Before touching the target: become non-dumpable and drop every fd but ``sock``.

    Non-dumpable first, while still in our own user namespace: once in the
    target's, its root could otherwise ptrace this process or read its
    ``/proc/PID/fd`` (and the TAP fd in it). The parent's other fds (in the
    CNI engine: other containers' TAPs, the API and the ADD/DEL sockets) have
    no business in there. The cyclic GC is off for the rest of the child's
    life: a collected parent object (a socket) would otherwise close its old
    fd number, which by then may be our TAP.
    """
    gc.disable()
    try:
        netns.set_dumpable(False)
    except OSError as exc:
        raise _ChildFailure(f"TAP helper: {exc.strerror}") from None
    netns.close_fds_except([sock.fileno()])


def _child_report(sock: socket.socket, message: str) -> None:  # pragma: no cover
    with contextlib.suppress(OSError):
        sock.send(f"error\n{message}".encode())


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _child_open(netns_path: str, userns_path: str | None, tapname: str, mtu: int | None,
                configure: ConfigureSpec | None, mac: bytes | None, want_vnet_hdr: bool,
                want_offload: bool) -> tuple[int, bytes]:  # pragma: no cover
    # Open both namespace files before moving: after joining a user namespace
    # /proc permission checks are made with the new credentials.
    try:
        net_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _ChildFailure(f"netns path {netns_path} does not exist") from None
    except OSError as exc:
        raise _ChildFailure(f"cannot open {netns_path}: {_why(exc)}") from None
    user_fd = -1
    if userns_path is not None:
        try:
            if netns.userns_differs(userns_path):
                user_fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _ChildFailure(f"cannot open {userns_path}: {_why(exc)}") from None
    if user_fd >= 0:
        try:
            netns.setns(user_fd, netns.CLONE_NEWUSER)
        except OSError as exc:
            raise _ChildFailure(f"cannot join user namespace {userns_path}: "
                                f"{os.strerror(exc.errno or 0)}") from None
    try:
        netns.setns(net_fd, netns.CLONE_NEWNET)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EPERM:
            try:
                if netns.owner_userns_id(net_fd) != netns.ns_id("/proc/self/ns/user"):
                    hint = (" (it belongs to another user namespace: pass that one's path "
                            "as the user namespace to join)")
            except OSError:  # EPERM again: its owner is outside the namespace we are in
                hint = " (it belongs to a user namespace outside the one joined)"
        raise _ChildFailure(f"cannot join network namespace {netns_path}: "
                            f"{os.strerror(exc.errno or 0)}{hint}") from None

    fd, name, vnet_hdr = _tun_attach(tapname, want_vnet_hdr)
    offload = uso = False
    if vnet_hdr and want_offload:
        offload, uso = _tun_offload(fd)

    # Device ioctls act in the namespace the socket was created in: this one.
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if mac is not None:
            _ioctl_or_fail(ctl, SIOCSIFHWADDR, _IFREQ_HWADDR.pack(_ifn(name), ARPHRD_ETHER, mac),
                           f"cannot set MAC address {mac_to_str(mac)} on {name}")
        if mtu is not None:
            _ioctl_or_fail(ctl, SIOCSIFMTU, _IFREQ_INT.pack(_ifn(name), mtu),
                           f"cannot set MTU {mtu} on {name}")
        if configure is not None:
            _configure(ctl, name, configure)
        hw = fcntl.ioctl(ctl, SIOCGIFHWADDR, _IFREQ_HWADDR.pack(_ifn(name), 0, b""))
        got_mac = _IFREQ_HWADDR.unpack(hw)[2]
        got_mtu = _IFREQ_INT.unpack(fcntl.ioctl(ctl, SIOCGIFMTU, _IFREQ_INT.pack(_ifn(name), 0)))[1]
    finally:
        ctl.close()
    return fd, _encode_reply(name, vnet_hdr, offload, uso, got_mac, got_mtu)


def _ifn(name: str) -> bytes:
    return name.encode()


def _ioctl(fd: Any, request: int, arg: Any) -> Any:
    """fcntl.ioctl, a seam for tests that simulate kernels lacking a feature."""
    return fcntl.ioctl(fd, request, arg)


def _ioctl_or_fail(fd: Any, request: int, arg: Any, what: str) -> Any:  # pragma: no cover
    try:
        return _ioctl(fd, request, arg)
    except OSError as exc:
        raise _ChildFailure(f"{what}: {_why(exc)}") from None


def _tun_attach(tapname: str, want_vnet_hdr: bool) -> tuple[int, str, bool]:  # pragma: no cover
    """Open /dev/net/tun and bind it to TAP ``tapname``, with a 12-byte vnet header if we can."""
    def open_dev() -> int:
        try:
            return os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _ChildFailure(f"cannot open /dev/net/tun: {_why(exc)}") from None

    def setiff(fd: int, flags: int) -> str:
        res = _ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(_ifn(tapname), flags))
        return _IFREQ_FLAGS.unpack(res)[0].rstrip(b"\0").decode()

    fd = open_dev()
    if want_vnet_hdr:
        try:
            name = setiff(fd, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            _ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            return fd, name, True
        except OSError as exc:
            # EINVAL: a kernel without the feature. IFF_VNET_HDR cannot be dropped
            # from a bound fd, so start over without it; other errors are fatal below.
            if exc.errno != errno.EINVAL:
                os.close(fd)
                raise _ChildFailure(f"cannot create TAP device {tapname}: {_why(exc)}") from None
            os.close(fd)
            fd = open_dev()
    try:
        name = setiff(fd, IFF_TAP | IFF_NO_PI)
    except OSError as exc:
        os.close(fd)
        raise _ChildFailure(f"cannot create TAP device {tapname}: {_why(exc)}") from None
    return fd, name, False


def _tun_offload(fd: int) -> tuple[bool, bool]:  # pragma: no cover - child
    """Enable checksum and segmentation offloads: (TSO on, USO on)."""
    tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    for flags, result in ((tso | TUN_F_USO4 | TUN_F_USO6, (True, True)), (tso, (True, False))):
        try:
            _ioctl(fd, TUNSETOFFLOAD, flags)
            return result
        except OSError:
            continue
    with contextlib.suppress(OSError):
        _ioctl(fd, TUNSETOFFLOAD, 0)
    return False, False


_Sockaddr = ctypes.c_ubyte * 16


class _RtEntry(ctypes.Structure):
    """struct rtentry (<linux/route.h>), for SIOCADDRT; native layout and alignment."""

    _fields_ = [
        ("rt_pad1", ctypes.c_ulong),
        ("rt_dst", _Sockaddr),
        ("rt_gateway", _Sockaddr),
        ("rt_genmask", _Sockaddr),
        ("rt_flags", ctypes.c_ushort),
        ("rt_pad2", ctypes.c_short),
        ("rt_pad3", ctypes.c_ulong),
        ("rt_pad4", ctypes.c_void_p),
        ("rt_metric", ctypes.c_short),
        ("rt_dev", ctypes.c_char_p),
        ("rt_mtu", ctypes.c_ulong),
        ("rt_window", ctypes.c_ulong),
        ("rt_irtt", ctypes.c_ushort),
    ]


def _sockaddr_in(addr: ipaddress.IPv4Address) -> ctypes.Array[ctypes.c_ubyte]:
    return _Sockaddr.from_buffer_copy(_SOCKADDR_IN.pack(socket.AF_INET, 0, addr.packed))


def _set_up(ctl: socket.socket, name: str) -> None:  # pragma: no cover - child
    flags = _IFREQ_FLAGS.unpack(
        _ioctl_or_fail(ctl, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(_ifn(name), 0),
                       f"cannot read the flags of {name}"))[1]
    _ioctl_or_fail(ctl, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(_ifn(name), flags | IFF_UP),
                   f"cannot bring {name} up")


def _configure(ctl: socket.socket, name: str, spec: ConfigureSpec) -> None:  # pragma: no cover
    """What ``slirp4netns --configure`` does, with the same ioctls."""
    if spec.ipv6:
        _accept_router_adverts(name)
    if spec.address6 is not None:
        _static_ipv6_sysctls(name)
    _set_up(ctl, "lo")
    _set_up(ctl, name)
    addr = spec.address
    _ioctl_or_fail(ctl, SIOCSIFADDR, _IFREQ_INADDR.pack(_ifn(name), socket.AF_INET, 0,
                                                        addr.ip.packed),
                   f"cannot set address {addr} on {name}")
    _ioctl_or_fail(ctl, SIOCSIFNETMASK, _IFREQ_INADDR.pack(_ifn(name), socket.AF_INET, 0,
                                                           addr.network.netmask.packed),
                   f"cannot set address {addr} on {name}")
    if spec.gateway is not None:
        rt = _RtEntry()
        any4 = ipaddress.IPv4Address(0)
        rt.rt_dst = _sockaddr_in(any4)
        rt.rt_gateway = _sockaddr_in(spec.gateway)
        rt.rt_genmask = _sockaddr_in(any4)
        rt.rt_flags = RTF_UP | RTF_GATEWAY
        try:
            _ioctl(ctl, SIOCADDRT, bytearray(rt))
        except OSError as exc:
            # Re-attaching to a persistent TAP finds our own route still there: fine.
            # A default route elsewhere is not: the guest's traffic would bypass us.
            if exc.errno != errno.EEXIST or not _has_default_route(name, spec.gateway):
                raise _ChildFailure(f"cannot add the default route via {spec.gateway}: "
                                    f"{_why(exc)}") from None
    if spec.address6 is not None:
        _configure_static_ipv6(name, spec.address6, spec.gateway6)


def _ipv6_conf_dir(name: str) -> str:  # pragma: no cover - child
    conf = f"/proc/sys/net/ipv6/conf/{name}"
    if not os.path.isdir(conf):
        raise _ChildFailure(f"IPv6 is not available in the namespace (no {conf}); "
                            "turn IPv6 off (--enable-ipv6, \"ipv6\") or enable it in the "
                            "kernel")
    return conf


def _static_ipv6_sysctls(name: str) -> None:  # pragma: no cover - child
    """Before the TAP goes up: IPv6 on, no RAs taken, no DAD (see the module doc)."""
    conf = _ipv6_conf_dir(name)
    _sysctl_at_least(f"{conf}/disable_ipv6", 0, exact=True)
    _sysctl_at_least(f"{conf}/accept_ra", 0, exact=True)
    _sysctl_at_least(f"{conf}/accept_dad", 0, exact=True)


def _configure_static_ipv6(name: str, address: ipaddress.IPv6Interface,
                           gateway: ipaddress.IPv6Address | None) -> None:  # pragma: no cover
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as ctl6:
        index = _IFREQ_INT.unpack(_ioctl_or_fail(
            ctl6, SIOCGIFINDEX, _IFREQ_INT.pack(_ifn(name), 0),
            f"cannot find the index of {name}"))[1]
        try:
            _ioctl(ctl6, SIOCSIFADDR, _IN6_IFREQ.pack(address.ip.packed,
                                                      address.network.prefixlen, index))
        except OSError as exc:
            if exc.errno != errno.EEXIST:  # re-attaching to a persistent TAP: ours already
                raise _ChildFailure(f"cannot set address {address} on {name}: "
                                    f"{_why(exc)}") from None
        if gateway is None:
            return
        any6 = bytes(16)
        route = _IN6_RTMSG.pack(any6, any6, gateway.packed, 0, 0, 0, 0, 0,
                                RTF_UP6 | RTF_GATEWAY6, index)
        try:
            _ioctl(ctl6, SIOCADDRT, route)
        except OSError as exc:
            if exc.errno != errno.EEXIST or not _has_default_route6(name, gateway):
                raise _ChildFailure(f"cannot add the default route via {gateway}: "
                                    f"{_why(exc)}") from None


def _has_default_route6(name: str, gateway: ipaddress.IPv6Address) -> bool:  # pragma: no cover
    """Whether this netns routes ::/0 via ``gateway`` on ``name`` (/proc/net/ipv6_route)."""
    try:
        with open("/proc/self/net/ipv6_route") as f:
            rows = [line.split() for line in f]
    except OSError:
        return False
    return any(len(r) >= 10 and r[9] == name and r[0] == "0" * 32 and r[1] == "00"
               and r[4] == gateway.packed.hex() for r in rows)


def _accept_router_adverts(name: str) -> None:  # pragma: no cover - child
    """Make the kernel of the joined namespace take IPv6 on ``name`` from RAs (module doc)."""
    conf = _ipv6_conf_dir(name)
    _sysctl_at_least(f"{conf}/disable_ipv6", 0, exact=True)
    forwarding = int(_sysctl_read(f"{conf}/forwarding"))
    _sysctl_at_least(f"{conf}/accept_ra", 2 if forwarding else 1)


def _sysctl_read(path: str) -> str:  # pragma: no cover - child
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise _ChildFailure(f"cannot read {path}: {_why(exc)}") from None


def _sysctl_at_least(path: str, want: int, exact: bool = False) -> None:  # pragma: no cover
    """Write ``want`` to sysctl ``path`` unless it already holds it (or more, unless exact)."""
    have = int(_sysctl_read(path))
    if have == want or (not exact and have > want):
        return
    try:
        with open(path, "w") as f:
            f.write(f"{want}\n")
    except OSError as exc:
        raise _ChildFailure(f"cannot set {path} to {want} (for --enable-ipv6): "
                            f"{_why(exc)}") from None


def _has_default_route(name: str, gateway: ipaddress.IPv4Address) -> bool:  # pragma: no cover
    """Whether this netns routes 0.0.0.0/0 via ``gateway`` on ``name`` (/proc/net/route).

    /proc/self/net shows the namespace of the reading thread: the one we joined.
    """
    want = socket.htonl(int(gateway))
    try:
        with open("/proc/self/net/route") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return False
    return any(len(r) >= 8 and r[0] == name and r[1] == "00000000" and r[7] == "00000000"
               and int(r[2], 16) == want for r in rows)
