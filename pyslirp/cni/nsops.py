"""Small operations inside a container's network namespace: inspect and remove an interface.

Theory of operation
-------------------
CHECK must look at the interface, address and route the ADD created, and DEL
after an engine crash must remove a TAP that is still there. Both happen in
the container's network namespace, which the engine must not join itself (its
host sockets belong to its own namespace). As in :mod:`pyslirp.runtime.tap`,
a forked child joins the namespace (its user namespace first when given and
different from ours), does the work with ioctls, ``/proc/self/net/route`` and,
for deletion, one hand-built ``RTM_DELLINK`` netlink message, and writes one
JSON line back over a pipe before ``os._exit``. No pyroute2: importing it
costs about 0.2 s, and these are a handful of syscalls.

IPv6 addresses and default routes come from ``/proc/self/net/if_inet6`` and
``ipv6_route`` (the namespace of the reading thread: the joined one).

What it deliberately does not do: secondary IPv4 addresses (``SIOCGIFADDR``
reports the first one, which is the one ADD set).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any

from pyslirp.runtime import netns

SIOCGIFINDEX = 0x8933
SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
SIOCGIFHWADDR = 0x8927
SIOCGIFMTU = 0x8921
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000

_IFREQ_INT = struct.Struct("16si20x")
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_HWADDR = struct.Struct("16sH6s16x")
_IFREQ_INADDR = struct.Struct("16sHH4s8x8x")

# netlink (linux/netlink.h, linux/rtnetlink.h)
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
RTM_DELLINK = 17
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2

CHILD_TIMEOUT = 10.0


class NetnsError(OSError):
    """The namespace could not be entered or the operation failed; one-line message."""


def run_in_netns(netns_path: str, func: Callable[..., Any], *args: Any,
                 userns_path: str | None = None, timeout: float = CHILD_TIMEOUT) -> Any:
    """Run ``func(*args)`` in a forked child inside ``netns_path``; return its JSON-able value."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(rfd)
        code = 1
        try:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            # As the TAP helper (runtime/tap.py): nothing of the engine's reaches the target.
            gc.disable()
            netns.set_dumpable(False)
            netns.close_fds_except([wfd])
            try:
                _enter(netns_path, userns_path)
                reply = {"value": func(*args)}
            except NetnsError as exc:
                reply = {"error": str(exc)}
            except OSError as exc:
                reply = {"error": f"{exc.strerror or exc}"}
            os.write(wfd, json.dumps(reply).encode())
            code = 0
        except BaseException:  # noqa: BLE001 - the child must end in _exit whatever happens
            pass
        finally:
            os._exit(code)
    os.close(wfd)
    chunks = []
    try:
        import select

        deadline_poll = select.poll()
        deadline_poll.register(rfd, select.POLLIN)
        while True:
            if not deadline_poll.poll(int(timeout * 1000)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                raise NetnsError(errno.ETIMEDOUT, f"namespace helper for {netns_path} hung")
            data = os.read(rfd, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not chunks:
        raise NetnsError(errno.EIO, f"namespace helper for {netns_path} died")
    reply = json.loads(b"".join(chunks))
    if "error" in reply:
        raise NetnsError(errno.EIO, reply["error"])
    return reply["value"]


def _enter(netns_path: str, userns_path: str | None) -> None:  # pragma: no cover - child
    try:
        net_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(exc.errno or 0, f"cannot open {netns_path}: {exc.strerror}") from None
    if userns_path is not None and netns.userns_differs(userns_path):
        user_fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
        netns.setns(user_fd, netns.CLONE_NEWUSER)
    try:
        netns.setns(net_fd, netns.CLONE_NEWNET)
    except OSError as exc:
        raise NetnsError(exc.errno or 0, f"cannot join network namespace {netns_path}: "
                         f"{os.strerror(exc.errno or 0)}") from None


def _ifn(name: str) -> bytes:
    return name.encode()


def probe_interface(ifname: str) -> dict[str, Any] | None:  # pragma: no cover - child
    """What the kernel says about ``ifname`` here: None if it does not exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        try:
            fcntl.ioctl(ctl, SIOCGIFINDEX, _IFREQ_INT.pack(_ifn(ifname), 0))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        flags = _IFREQ_FLAGS.unpack(
            fcntl.ioctl(ctl, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(_ifn(ifname), 0)))[1]
        mac = _IFREQ_HWADDR.unpack(
            fcntl.ioctl(ctl, SIOCGIFHWADDR, _IFREQ_HWADDR.pack(_ifn(ifname), 0, b"")))[2]
        mtu = _IFREQ_INT.unpack(fcntl.ioctl(ctl, SIOCGIFMTU, _IFREQ_INT.pack(_ifn(ifname), 0)))[1]
        address = None
        try:
            raw = fcntl.ioctl(ctl, SIOCGIFADDR, _IFREQ_INADDR.pack(_ifn(ifname), 0, 0, b""))
            mask = fcntl.ioctl(ctl, SIOCGIFNETMASK, _IFREQ_INADDR.pack(_ifn(ifname), 0, 0, b""))
            addr = socket.inet_ntoa(_IFREQ_INADDR.unpack(raw)[3])
            prefix = bin(int.from_bytes(_IFREQ_INADDR.unpack(mask)[3], "big")).count("1")
            address = f"{addr}/{prefix}"
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
    gateways = []
    with open("/proc/self/net/route") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[0] == ifname and fields[1] == "00000000" \
                    and fields[7] == "00000000":
                gateways.append(socket.inet_ntoa(struct.pack("<I", int(fields[2], 16))))
    return {"up": bool(flags & IFF_UP), "mac": ":".join(f"{b:02x}" for b in mac), "mtu": mtu,
            "address": address, "gateways": gateways + ipv6_default_gateways(ifname),
            "addresses6": ipv6_addresses(ifname)}


def _inet6_text(hex32: str) -> str:
    return socket.inet_ntop(socket.AF_INET6, bytes.fromhex(hex32))


def ipv6_addresses(ifname: str) -> list[str]:  # pragma: no cover - child
    """``ADDRESS/PREFIX`` of every IPv6 address on ``ifname`` (/proc/net/if_inet6)."""
    try:
        with open("/proc/self/net/if_inet6") as f:
            rows = [line.split() for line in f]
    except FileNotFoundError:  # a kernel without IPv6
        return []
    return [f"{_inet6_text(r[0])}/{int(r[2], 16)}" for r in rows
            if len(r) >= 6 and r[5] == ifname]


def ipv6_default_gateways(ifname: str) -> list[str]:  # pragma: no cover - child
    """The next hops of ``::/0`` routes on ``ifname`` (/proc/net/ipv6_route)."""
    try:
        with open("/proc/self/net/ipv6_route") as f:
            rows = [line.split() for line in f]
    except FileNotFoundError:
        return []
    return [_inet6_text(r[4]) for r in rows
            if len(r) >= 10 and r[9] == ifname and r[0] == "0" * 32 and r[1] == "00"
            and r[4] != "0" * 32]


def remove_tap(ifname: str) -> str:  # pragma: no cover - child
    """Remove TAP ``ifname`` here if it exists; returns what was done.

    A TAP we opened disappears with its last file descriptor, so after an
    engine crash this normally finds nothing. It acts only on TAP devices:
    attaching with ``TUNSETIFF`` succeeds (the device is ours to drop:
    ``TUNSETPERSIST`` 0 and close) or fails with EBUSY (another process holds
    it: delete the link by netlink); any other error means "not a TAP", and
    the interface is left alone.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        try:
            res = fcntl.ioctl(ctl, SIOCGIFINDEX, _IFREQ_INT.pack(_ifn(ifname), 0))
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                return "absent"
            raise
        index = _IFREQ_INT.unpack(res)[1]
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(_ifn(ifname), IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return f"left alone (not a TAP: {exc.strerror})"
        _netlink_del_link(index)
        return "deleted"
    else:
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
        return "deleted"
    finally:
        os.close(fd)


def _netlink_del_link(index: int) -> None:  # pragma: no cover - child
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)
        msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_DELLINK,
                             NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body
        nl.send(msg)
        reply = nl.recv(65536)
        _len, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(reply)
        if kind == NLMSG_ERROR:
            err = -struct.unpack_from("=i", reply, _NLMSGHDR.size)[0]
            if err and err != errno.ENODEV:
                raise OSError(err, f"cannot delete interface {index}: {os.strerror(err)}")
