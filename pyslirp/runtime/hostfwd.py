"""Port forwarding: host ports whose TCP connections and UDP datagrams go into the guest.

Theory of operation
-------------------
:class:`HostForwarder` is what the API socket's ``add_hostfwd`` and
``remove_hostfwd`` drive (pyslirp.api.Forwarder). It owns host sockets bound
to ``host_addr:host_port`` and hands their traffic to the stack's engines, so
a forwarded flow is an ordinary flow from then on: the same relay code, the
same backpressure, the same throughput as the guest's own outbound flows.

* **TCP**: a listening socket (``SO_REUSEADDR``, so a port can be forwarded
  again while old connections linger in TIME_WAIT; a port someone listens on
  is still refused). Each accepted connection becomes a
  :class:`~pyslirp.runtime.hostsockets.TcpHandle` of the attachment and an
  active open toward the guest (``TcpEngine.open_to_guest``: SYN_SENT). The
  engine asks the attachment to start reading the host socket once the guest
  accepted; a guest that refuses (RST) or never answers makes the engine
  reset the host connection, which is what the host client would see from a
  closed port.
* **UDP**: a bound socket per forward. The guest port gets one permanent
  flow in the UDP engine (``UdpEngine.add_forward``) whose host handle is a
  :class:`_UdpPorts`: datagrams from any peer go in, and the guest's replies
  leave through the socket that peer last reached (several host ports may
  forward to one guest port), so the peer hears back from the port it used.

Source addresses (as libslirp does): a peer from a non-loopback address
appears to the guest with that address and its own port, so a server in the
guest logs the real client; a loopback peer (127.0.0.0/8, 0.0.0.0) appears as
the gateway (10.0.2.2). So does a peer whose address lies inside the virtual
network, because the guest would look for it on the link and find nobody.
If that 4-tuple is already taken (two loopback peers with the same port), a
free port stands in for the peer's.

The guest's MAC may be unknown when the first forwarded packet arrives (a
container that has only listened so far has sent nothing): then we ask by
ARP and hold the work until the guest answered, polling briefly. Held work
is bounded, since each parked connection is a descriptor: at most
``max_parked`` accepted TCP connections (default ``_MAX_PARKED_TCP``, 128;
more are reset at once, counted ``hostfwd.tcp_parked_full``) and
``_MAX_PENDING`` datagrams. A parked connection waits at most
``park_timeout`` (default ``_PARK_TIMEOUT``, 3 s): if the MAC is still unknown
then, it is reset (``hostfwd.tcp_guest_mac_timeout``), as nothing could be sent
to the guest anyway; a datagram is passed on (and dropped at the link).
Connections the engine takes count against its own inbound limits
(``TcpConfig.max_inbound_flows``/``max_inbound_half_open``), apart from the
guest's outbound ones.

Host port 0 asks the kernel for a free port (the ``bind`` picks it);
:meth:`HostForwarder.add` returns the port it got, and the forward is known by
that port from then on.

Removing a forward closes its host socket at once: nobody can connect to or
send to the port any more. TCP connections already forwarded carry on until
they end, as with slirp4netns.

A forward can also serve a socket it is handed instead of binding one
(``add(..., sock=)``): the CNI engine takes over the port reservations rootful
podman makes (:mod:`pyslirp.runtime.adopt`). Closing the forward closes only
our descriptor; whoever shares the socket keeps it.

Not done: IPv6 forwards, SCTP (slirp4netns has neither).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyslirp.runtime.attachment import Attachment
from pyslirp.runtime.hostsockets import TcpHandle

log = logging.getLogger("pyslirp")

_ACCEPT_BATCH = 64
#: How long a listener is left alone after accept failed (out of file descriptors).
_ACCEPT_PAUSE = 0.5
_UDP_BATCH = 64
_UDP_MAX = 65536
_LISTEN_BACKLOG = 128
#: Peers remembered per forwarded UDP guest port (which socket answers whom).
_MAX_UDP_PEERS = 4096
#: Datagrams held back while the guest's MAC is being asked for.
_MAX_PENDING = 256
#: Accepted TCP connections held back meanwhile (each holds a descriptor) ...
_MAX_PARKED_TCP = 128
#: ... and for how long at most before they are reset.
_PARK_TIMEOUT = 3.0
_ARP_POLL = 0.01
_ARP_RETRY = 0.25
#: How long a held datagram waits for the MAC before it is passed on regardless.
_ARP_GIVE_UP = 3.0
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)


class _UdpPorts:
    """The host side of one forwarded UDP guest port: one or more bound sockets.

    It stands where the attachment expects a flow's socket (``sendto``,
    ``fileno``, ``close``), choosing the socket each peer last reached.
    """

    __slots__ = ("loop", "socks", "peers", "flow", "closed")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.socks: list[socket.socket] = []
        self.peers: dict[tuple[str, int], socket.socket] = {}
        self.flow: Any = None
        self.closed = False

    def sendto(self, data: Any, dst: tuple[str, int]) -> int:
        sock = self.peers.get(dst) or self.socks[0]
        return sock.sendto(data, dst)

    def fileno(self) -> int:
        return self.socks[0].fileno() if self.socks else -1

    def drop(self, sock: socket.socket) -> None:
        """Stop using one socket (its forward was removed) and close it."""
        self.socks.remove(sock)
        for peer in [p for p, s in self.peers.items() if s is sock]:
            del self.peers[peer]
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in self.socks:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self.socks.clear()
        self.peers.clear()


@dataclass(eq=False)
class _Forward:
    proto: str
    host_addr: str
    host_port: int
    guest_addr: bytes
    guest_port: int
    sock: socket.socket
    ports: _UdpPorts | None = None
    accepted: int = field(default=0)


class HostForwarder:
    """Host ports forwarded into one attachment's guest; see the module docstring."""

    def __init__(self, attachment: Attachment, rng: random.Random | None = None) -> None:
        self.attachment = attachment
        self.loop = attachment.loop
        self.stack = attachment.stack
        self.forwards: dict[tuple[str, str, int], _Forward] = {}
        self._udp_ports: dict[tuple[bytes, int], _UdpPorts] = {}
        #: Work waiting for the guest's MAC, with the time it runs regardless.
        self._pending: list[tuple[float, Callable[[], None]]] = []
        #: Accepted TCP connections among it, and their bounds (module docstring).
        self._parked = 0
        self.max_parked = _MAX_PARKED_TCP
        self.park_timeout = _PARK_TIMEOUT
        self._arp_started: float | None = None
        self._arp_sent: float = 0.0
        self._arp_target = attachment.config.guest_addr
        self._rng = rng or random.Random()
        self._closed = False

    # ---- the API's calls --------------------------------------------------------------
    def add(self, proto: str, host_addr: str, host_port: int, guest_addr: str,
            guest_port: int, sock: socket.socket | None = None) -> int:
        """Forward ``host_addr:host_port`` to ``guest_addr:guest_port``; OSError if the
        port cannot be had (EADDRINUSE, EACCES for a privileged port, ...).

        Returns the host port served: ``host_port`` itself, or for ``host_port`` 0
        the free port the kernel chose (the forward is known by that port from then
        on, for :meth:`remove` too).

        ``sock``: serve this socket instead of binding one (a port someone else
        reserved and handed over, see :mod:`pyslirp.runtime.adopt`): an IPv4
        socket of the protocol's type bound to exactly ``host_addr:host_port``,
        listening for TCP (ValueError otherwise). The forwarder owns it from
        then on (made non-blocking, closed with the forward).
        """
        if proto not in ("tcp", "udp"):
            raise ValueError(f"unknown protocol {proto!r}")
        if host_port and (proto, host_addr, host_port) in self.forwards:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        guest = socket.inet_aton(guest_addr)
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        if sock is not None:
            _check_adopted(sock, kind, host_addr, host_port)
            sock.setblocking(False)
            if proto == "udp":
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        else:
            sock = self._bind(proto, kind, host_addr, host_port)
            host_port = sock.getsockname()[1]  # the kernel's choice for port 0
        fwd = _Forward(proto, host_addr, host_port, guest, guest_port, sock)
        if proto == "tcp":
            self.loop.add_reader(sock.fileno(), self._on_accept, fwd)
        else:
            self._add_udp(fwd)
        self.forwards[(proto, host_addr, host_port)] = fwd
        self._arp_target = guest
        return host_port

    @staticmethod
    def _bind(proto: str, kind: int, host_addr: str, host_port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if proto == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            sock.bind((host_addr, host_port))
            if proto == "tcp":
                sock.listen(_LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def remove(self, proto: str, host_addr: str, host_port: int) -> None:
        """Close the forward's host socket; connections already forwarded go on."""
        fwd = self.forwards.pop((proto, host_addr, host_port), None)
        if fwd is None:
            raise OSError(errno.ENOENT, "no such forward")
        if fwd.ports is None:
            self.loop.remove_reader(fwd.sock.fileno())
            fwd.sock.close()
            return
        ports = fwd.ports
        if len(ports.socks) > 1:
            ports.drop(fwd.sock)
            return
        # The last socket of this guest port: the flow goes, and with it the socket
        # (the engine calls the attachment's udp_close, which closes the ports).
        del self._udp_ports[(fwd.guest_addr, fwd.guest_port)]
        self.stack.udp.remove_forward(ports.flow)
        ports.close()

    def close(self) -> None:
        """Close every forward's socket (at shutdown)."""
        self._closed = True
        for proto, host_addr, host_port in list(self.forwards):
            self.remove(proto, host_addr, host_port)
        # Work still waiting for the guest's MAC: connections are closed, datagrams dropped.
        pending, self._pending = self._pending, []
        for _deadline, work in pending:
            work()

    # ---- TCP --------------------------------------------------------------------------
    def _on_accept(self, fwd: _Forward) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = fwd.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: the connection waits in the backlog. The listener stays
                # readable, so stop watching it for a while instead of spinning on it.
                self.stack.link.count("hostfwd.accept_error")
                log.warning("port forward %s:%d: accept failed: %s; pausing %.1f s",
                            fwd.host_addr, fwd.host_port, exc.strerror, _ACCEPT_PAUSE)
                self.loop.remove_reader(fwd.sock.fileno())
                self.loop.call_later(_ACCEPT_PAUSE, self._resume_accept, fwd)
                return
            fwd.accepted += 1
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.stack.link.guest_mac is not None and not self._pending:
                self._open_tcp(fwd, conn, peer)
            elif self._parked >= self.max_parked:
                self.stack.link.count("hostfwd.tcp_parked_full")
                _reset(conn)
            else:
                self._parked += 1
                self._when_guest_known(functools.partial(self._open_parked, fwd, conn, peer),
                                       self.park_timeout)

    def _open_parked(self, fwd: _Forward, conn: socket.socket, peer: tuple[str, int]) -> None:
        """A connection that waited for the guest's MAC: forward it, or reset it if the
        MAC is still unknown (its time is up)."""
        self._parked -= 1
        if self.stack.link.guest_mac is None and not self._closed:
            self.stack.link.count("hostfwd.tcp_guest_mac_timeout")
            _reset(conn)
            return
        self._open_tcp(fwd, conn, peer)

    def _resume_accept(self, fwd: _Forward) -> None:
        if self.forwards.get((fwd.proto, fwd.host_addr, fwd.host_port)) is fwd:
            self.loop.add_reader(fwd.sock.fileno(), self._on_accept, fwd)

    def _open_tcp(self, fwd: _Forward, conn: socket.socket, peer: tuple[str, int]) -> None:
        if self._closed:
            _reset(conn)
            return
        engine = self.stack.tcp
        remote = self._as_seen_by_guest(peer[0])
        port = self._free_tcp_port(fwd, remote, peer[1])
        handle = TcpHandle()
        handle.sock = conn
        handle.fd = conn.fileno()
        flow = None
        if port is not None:
            flow = engine.open_to_guest(remote, port, fwd.guest_addr, fwd.guest_port,
                                        self.loop.time(), host_handle=handle)
        if flow is None:
            self.stack.link.count("hostfwd.tcp_refused")
            _reset(conn)
            return
        self.stack.link.count("hostfwd.tcp_opened")
        self.attachment.schedule_flush()

    def _free_tcp_port(self, fwd: _Forward, remote: bytes, port: int) -> int | None:
        flows = self.stack.tcp.flows
        if (fwd.guest_addr, fwd.guest_port, remote, port) not in flows:
            return port
        for _ in range(64):
            port = self._rng.randrange(1024, 65536)
            if (fwd.guest_addr, fwd.guest_port, remote, port) not in flows:
                return port
        return None

    # ---- UDP --------------------------------------------------------------------------
    def _add_udp(self, fwd: _Forward) -> None:
        gkey = (fwd.guest_addr, fwd.guest_port)
        ports = self._udp_ports.get(gkey)
        if ports is None or ports.closed:
            ports = _UdpPorts(self.loop)
            ports.socks.append(fwd.sock)
            ports.flow = self.stack.udp.add_forward(fwd.guest_addr, fwd.guest_port, ports,
                                                    self.loop.time())
            self._udp_ports[gkey] = ports
        else:
            ports.socks.append(fwd.sock)
        fwd.ports = ports
        self.loop.add_reader(fwd.sock.fileno(), self._on_udp_readable, ports, fwd.sock)

    def _on_udp_readable(self, ports: _UdpPorts, sock: socket.socket) -> None:
        now = self.loop.time()
        udp = self.stack.udp
        flow = ports.flow
        peers = ports.peers
        known = self.stack.link.guest_mac is not None
        for _ in range(_UDP_BATCH):
            try:
                data, (src_ip, src_port) = sock.recvfrom(_UDP_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # An ICMP error for something the guest sent from this port (IP_RECVERR).
                self.attachment.host.udp_read_errors(flow, sock, now)
                continue
            if peers.get((src_ip, src_port)) is not sock:
                if len(peers) >= _MAX_UDP_PEERS:
                    peers.clear()
                peers[(src_ip, src_port)] = sock
            if known:
                udp.host_datagram(flow, src_ip, src_port, data, now)
            elif len(self._pending) - self._parked < _MAX_PENDING:
                self._when_guest_known(functools.partial(
                    self._late_datagram, flow, src_ip, src_port, data), _ARP_GIVE_UP)
            else:
                self.stack.link.count("hostfwd.udp_no_guest_mac")
        self.attachment.schedule_flush()

    def _late_datagram(self, flow: Any, src_ip: str, src_port: int, data: bytes) -> None:
        if not self._closed:
            self.stack.udp.host_datagram(flow, src_ip, src_port, data, self.loop.time())

    # ---- common -----------------------------------------------------------------------
    def _as_seen_by_guest(self, ip: str) -> bytes:
        """The source address the guest sees for host peer ``ip`` (module docstring)."""
        addr = socket.inet_aton(ip)
        if addr[0] == 127 or addr == b"\0\0\0\0" or self.stack.in_network(addr):
            return self.attachment.config.gateway
        return addr

    def _when_guest_known(self, work: Callable[[], None], timeout: float) -> None:
        """Run ``work`` now if the guest's MAC is known, else once it is or after
        ``timeout`` seconds, whichever comes first."""
        if self.stack.link.guest_mac is not None and not self._pending:
            work()
            return
        now = self.loop.time()
        self._pending.append((now + timeout, work))
        if self._arp_started is None:
            self._arp_started = self._arp_sent = now
            self.stack.resolve_guest(self._arp_target)
            self.attachment.schedule_flush()
            self.loop.call_later(_ARP_POLL, self._poll_guest_mac)

    def _poll_guest_mac(self) -> None:
        if self._closed:
            return
        now = self.loop.time()
        if self.stack.link.guest_mac is None:
            due = [work for deadline, work in self._pending if deadline <= now]
            if due:
                self.stack.link.count("hostfwd.guest_mac_unknown")
                self._pending = [(d, w) for d, w in self._pending if d > now]
                for work in due:
                    work()
                self.attachment.schedule_flush()
            if self._pending:
                if now - self._arp_sent >= _ARP_RETRY:
                    self._arp_sent = now
                    self.stack.resolve_guest(self._arp_target)
                    self.attachment.schedule_flush()
                self.loop.call_later(_ARP_POLL, self._poll_guest_mac)
                return
        self._arp_started = None
        pending, self._pending = self._pending, []
        for _deadline, work in pending:
            work()
        self.attachment.schedule_flush()


def _check_adopted(sock: socket.socket, kind: int, host_addr: str, host_port: int) -> None:
    """A handed-over socket must be what the forward promises to serve."""
    if sock.family != socket.AF_INET or sock.type != kind:
        raise ValueError(f"socket is {sock.family!r}/{sock.type!r}, not AF_INET/{kind!r}")
    bound = sock.getsockname()
    if bound != (host_addr, host_port):
        raise ValueError(f"socket is bound to {bound[0]}:{bound[1]}, not "
                         f"{host_addr}:{host_port}")
    if kind == socket.SOCK_STREAM and \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("TCP socket is not listening")


def _reset(conn: socket.socket) -> None:
    """Close with an RST, as a port nobody listens on would answer."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
