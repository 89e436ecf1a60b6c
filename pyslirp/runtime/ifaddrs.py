"""Interface addresses for ``--outbound-addr[6]=IFNAME``, and binding host sockets to them.

Theory of operation
-------------------
slirp4netns resolves an interface name given to ``--outbound-addr`` with
getifaddrs(3), taking the first address of the wanted family, once at
start-up; libslirp then binds every outbound host socket of that family to
it before ``connect``/``sendto``. :func:`interface_addresses` is that lookup
(through ctypes, so it costs no pyroute2 import on the command-line path);
:class:`Outbound` is what the runtime's attachment consults when it opens a
host socket.

What it deliberately does not do: no re-resolution when the interface's
address changes later (slirp4netns does not either), no IPv6 zone handling
(a link-local outbound address is refused).
"""

from __future__ import annotations

import _socket
import ctypes
import ipaddress
import socket
from dataclasses import dataclass

# dlopen(NULL): the libc already mapped into the interpreter (find_library would
# run ldconfig in a subprocess).
_libc = ctypes.CDLL(None, use_errno=True)


class _Sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _SockaddrIn6(ctypes.Structure):
    _fields_ = [("sin6_family", ctypes.c_ushort), ("sin6_port", ctypes.c_uint16),
                ("sin6_flowinfo", ctypes.c_uint32), ("sin6_addr", ctypes.c_ubyte * 16),
                ("sin6_scope_id", ctypes.c_uint32)]


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)), ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint), ("ifa_addr", ctypes.POINTER(_Sockaddr)),
    ("ifa_netmask", ctypes.POINTER(_Sockaddr)), ("ifa_ifu", ctypes.POINTER(_Sockaddr)),
    ("ifa_data", ctypes.c_void_p),
]
_libc.getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_Ifaddrs))]
_libc.getifaddrs.restype = ctypes.c_int
_libc.freeifaddrs.argtypes = [ctypes.POINTER(_Ifaddrs)]
_libc.freeifaddrs.restype = None


def interface_addresses(name: str, version: int) -> list[str] | None:
    """The IPv4 (``version`` 4) or IPv6 (6) addresses of interface ``name`` in getifaddrs
    order; None if there is no such interface."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return None
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    head = ctypes.POINTER(_Ifaddrs)()
    if _libc.getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "getifaddrs failed to obtain interface addresses")
    found: list[str] = []
    try:
        node = head
        while node:
            ifa = node.contents
            if ifa.ifa_addr and ifa.ifa_name is not None and ifa.ifa_name.decode() == name \
                    and ifa.ifa_addr.contents.sa_family == family:
                if family == socket.AF_INET:
                    raw = bytes(ifa.ifa_addr.contents.sa_data[2:6])
                    found.append(str(ipaddress.IPv4Address(raw)))
                else:
                    sin6 = ctypes.cast(ifa.ifa_addr, ctypes.POINTER(_SockaddrIn6)).contents
                    addr6 = ipaddress.IPv6Address(bytes(sin6.sin6_addr))
                    if not addr6.is_link_local:  # would need a scope id to bind
                        found.append(str(addr6))
            node = ifa.ifa_next
    finally:
        _libc.freeifaddrs(head)
    return found


@dataclass(slots=True)
class Outbound:
    """The local addresses host sockets are bound to before they connect or send."""

    ipv4: str | None = None
    ipv6: str | None = None

    def bind(self, sock: _socket.socket) -> None:
        """Bind ``sock`` (port 0) to the address for its family, if one is set.

        Raises OSError like ``bind`` does (e.g. EADDRNOTAVAIL when the address
        went away); callers treat that as a failed connect/send.
        """
        if sock.family == socket.AF_INET:
            if self.ipv4 is not None:
                sock.bind((self.ipv4, 0))
        elif sock.family == socket.AF_INET6 and self.ipv6 is not None:
            sock.bind((self.ipv6, 0))

    def __bool__(self) -> bool:
        return self.ipv4 is not None or self.ipv6 is not None
