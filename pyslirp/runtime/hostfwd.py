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

IPv6 (with ``-6``; slirp4netns has no IPv6 forwards): a forward's host socket
is IPv6 when ``host_addr`` is, and its guest address may be of either family.
The same rules hold for IPv6 peers of an IPv6 guest address: a global peer
keeps its address; ``::1``, ``::``, link-local peers (the guest could not
route back to them) and peers inside the guest's prefix appear as the IPv6
gateway (fd00::2). A peer of the other family than the guest address cannot
keep its address: it appears as that family's gateway. A ``::`` socket is
dual-stack where the host makes it so (``net.ipv6.bindv6only=0``, Linux's
default) unless an IPv4 forward has the same port and protocol already (then it
takes IPv6 peers only, and the two coexist); its IPv4 peers arrive as
``::ffff:a.b.c.d`` and are IPv4 peers in every respect. Without a guest address
(an IPv6 ``host_addr`` with ``guest_addr`` ""), IPv4 peers go to the configured
IPv4 guest address and IPv6 peers to :meth:`HostForwarder.guest_addr6`,
looked up at each connection and datagram: the guest's address in the prefix
as last seen in its packets, else the target of its last Duplicate Address
Detection probe, else the SLAAC address its MAC gives. A UDP forward's socket
can so feed two guest endpoints (:class:`_UdpPorts`: IPv4 and IPv6), and
moves to the new endpoint when the guest's IPv6 address changes.

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

Not done: SCTP (slirp4netns has none); IPv6 link-local host addresses (a
zone would be needed); finding the guest's MAC by Neighbor Solicitation (it is
asked for by ARP, which an IPv6-only guest does not answer; any frame it sends,
such as the router solicitation of its link coming up, teaches it as well).
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
from pyslirp.runtime.hostsockets import TcpHandle, rearm_reader
from pyslirp.wire import ipv6

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
_LOOPBACK6 = bytes(15) + b"\x01"


class _UdpPorts:
    """The host side of one forwarded UDP guest endpoint (address, port): its sockets.

    It stands where the attachment expects a flow's socket (``sendto``,
    ``fileno``, ``close``), choosing the socket each peer last reached. The
    sockets belong to their forwards (one socket may feed two endpoints: a
    dual-stack ``::`` forward sends IPv4 peers to the guest's IPv4 address and
    IPv6 peers to its IPv6 one), so closing this closes none of them.
    """

    __slots__ = ("loop", "socks", "peers", "flow", "closed")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.socks: list[socket.socket] = []
        #: A peer as the engine knows it -> the socket it used and its real address.
        self.peers: dict[tuple[str, int], tuple[socket.socket, Any]] = {}
        self.flow: Any = None
        self.closed = False

    def sendto(self, data: Any, dst: tuple[str, int]) -> int:
        known = self.peers.get(dst)
        if known is not None:
            return known[0].sendto(data, known[1])
        # Somewhere no peer came from: a socket of the destination's family.
        v6 = ":" in dst[0]
        for sock in self.socks:
            if (sock.family == socket.AF_INET6) == v6:
                return sock.sendto(data, dst)
        sock = self.socks[0]
        if sock.family == socket.AF_INET6:  # an IPv4 destination from a dual-stack socket
            return sock.sendto(data, ("::ffff:" + dst[0], dst[1]))
        return sock.sendto(data, dst)

    def fileno(self) -> int:
        # The attachment's udp_close stops watching this fd; HostForwarder watches it
        # again while the socket's forward lives (_release_udp).
        return self.socks[0].fileno()

    def forget(self, sock: socket.socket) -> None:
        """Stop using one socket (its forward was removed or moved on)."""
        self.socks.remove(sock)
        for peer in [p for p, (s, _a) in self.peers.items() if s is sock]:
            del self.peers[peer]

    def close(self) -> None:
        self.closed = True
        self.peers.clear()


@dataclass(eq=False)
class _Forward:
    proto: str
    host_addr: str
    host_port: int
    #: Where IPv4 peers go (None: to ``guest6``) ...
    guest4: bytes | None
    #: ... and IPv6 peers (None: to ``guest4``, or with ``follow6`` to the guest's
    #: IPv6 address as it is then, :meth:`HostForwarder.guest_addr6`).
    guest6: bytes | None
    guest_port: int
    sock: socket.socket
    follow6: bool = False
    #: UDP: the guest endpoints this forward's socket feeds, by guest address.
    ports: dict[bytes, _UdpPorts] = field(default_factory=dict)
    accepted: int = field(default=0)

    def guest_for(self, peer_v4: bool, follow: Callable[[], bytes | None]) -> bytes | None:
        """The guest address a peer of this family reaches (None: none known yet)."""
        if peer_v4:
            return self.guest4 if self.guest4 is not None else self.guest6
        if self.guest6 is not None:
            return self.guest6
        return follow() if self.follow6 else self.guest4


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
        config = attachment.config
        self._ipv6 = config.enable_ipv6
        self._gateway6 = config.gateway6
        self._prefix6 = config.network6.network_address.packed[:8]

    # ---- the API's calls --------------------------------------------------------------
    def add(self, proto: str, host_addr: str, host_port: int, guest_addr: str,
            guest_port: int, sock: socket.socket | None = None, v6only: bool = False) -> int:
        """Forward ``host_addr:host_port`` to ``guest_addr:guest_port``; OSError if the
        port cannot be had (EADDRINUSE, EACCES for a privileged port, ...).

        Addresses of either family (IPv6 ones only with IPv6 enabled, else
        ValueError); ``guest_addr`` "" with an IPv6 ``host_addr``: IPv6 peers reach
        the guest's IPv6 address as it is at each connection or datagram, IPv4 peers
        of a dual-stack ``::`` the configured IPv4 guest address (module docstring).

        Returns the host port served: ``host_port`` itself, or for ``host_port`` 0
        the free port the kernel chose (the forward is known by that port from then
        on, for :meth:`remove` too).

        ``sock``: serve this socket instead of binding one (a port someone else
        reserved and handed over, see :mod:`pyslirp.runtime.adopt`): a socket of
        ``host_addr``'s family and the protocol's type bound to exactly ``host_addr:host_port``,
        listening for TCP (ValueError otherwise). The forwarder owns it from
        then on (made non-blocking, closed with the forward).

        ``v6only``: a ``::`` socket this binds takes IPv6 peers only, even with no
        IPv4 forward of its port (the CNI engine serves "every address" as an IPv4
        and an IPv6 forward, and a runtime may reserve the IPv4 port after it).
        """
        if proto not in ("tcp", "udp"):
            raise ValueError(f"unknown protocol {proto!r}")
        host6 = ":" in host_addr
        if host6:
            host_addr = ipv6.addr_to_str(ipv6.addr_from_str(host_addr))  # one spelling
        if host_port and (proto, host_addr, host_port) in self.forwards:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        fwd_guest = self._guest(host6, guest_addr)
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        if sock is not None:
            _check_adopted(sock, kind, host_addr, host_port)
            sock.setblocking(False)
            if proto == "udp" and not host6:
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        else:
            v6only = host6 and (v6only or self._has_ipv4_forward(proto, host_port))
            sock = self._bind(proto, kind, host_addr, host_port, v6only)
            host_port = sock.getsockname()[1]  # the kernel's choice for port 0
        guest4, guest6, follow6 = fwd_guest
        fwd = _Forward(proto, host_addr, host_port, guest4, guest6, guest_port, sock,
                       follow6=follow6)
        if proto == "tcp":
            self.loop.add_reader(sock.fileno(), self._on_accept, fwd)
        else:
            self.loop.add_reader(sock.fileno(), self._on_udp_readable, fwd)
            # The guest port is taken from its own flows at once (as slirp4netns does),
            # but the IPv4 one only if IPv4 peers can come (not for a "::1" that
            # follows the guest's IPv6 address; the IPv6 one then comes with its peers).
            if guest4 is not None and (not follow6 or _takes_ipv4(sock)):
                self._udp_ports_for(fwd, guest4)
            if guest6 is not None:
                self._udp_ports_for(fwd, guest6)
        self.forwards[(proto, host_addr, host_port)] = fwd
        if guest4 is not None:
            self._arp_target = guest4
        return host_port

    def _guest(self, host6: bool, guest_addr: str) -> tuple[bytes | None, bytes | None, bool]:
        """(IPv4 target, IPv6 target, follow the guest's IPv6 address) of a forward."""
        if host6 and not self._ipv6 or ":" in guest_addr and not self._ipv6:
            raise ValueError("IPv6 is not enabled (--enable-ipv6)")
        if not guest_addr:
            if not host6:
                raise ValueError("no guest address")
            return self.attachment.config.guest_addr, None, True
        if ":" not in guest_addr:
            return socket.inet_aton(guest_addr), None, False
        guest6 = ipv6.addr_from_str(guest_addr)
        if guest6[:8] != self._prefix6:
            raise ValueError(f"guest address {guest_addr} is outside "
                             f"{self.attachment.config.network6}")
        return None, guest6, False

    def _has_ipv4_forward(self, proto: str, host_port: int) -> bool:
        return any(p == proto and port == host_port and ":" not in addr
                   for p, addr, port in self.forwards)

    @staticmethod
    def _bind(proto: str, kind: int, host_addr: str, host_port: int,
              v6only: bool = False) -> socket.socket:
        v6 = ":" in host_addr
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                             kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            if proto == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            elif not v6:
                # IPv6 forward sockets do not ask (yet): the ICMPv6 errors of a forward's
                # datagrams are not relayed, unlike those of the guest's own IPv6 flows.
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            if v6only:  # an IPv4 forward has the port: take IPv6 peers only
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host_addr, host_port))
            if proto == "tcp":
                sock.listen(_LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def guest_addr6(self) -> bytes | None:
        """Where a forward without a guest address sends IPv6 peers now: the guest's
        address in the prefix as last seen (a packet's source, else a DAD probe's
        target), else the SLAAC address its MAC gives (EUI-64); None: nothing known."""
        ndp = self.stack.ndp
        if ndp is None:
            return None
        seen = ndp.guest_addr6 or ndp.guest_dad6
        if seen is not None:
            return seen
        mac = self.stack.link.guest_mac
        return None if mac is None else self._prefix6 + ipv6.interface_id(mac)

    def remove(self, proto: str, host_addr: str, host_port: int) -> None:
        """Close the forward's host socket; connections already forwarded go on."""
        if ":" in host_addr:
            host_addr = ipv6.addr_to_str(ipv6.addr_from_str(host_addr))
        fwd = self.forwards.pop((proto, host_addr, host_port), None)
        if fwd is None:
            raise OSError(errno.ENOENT, "no such forward")
        self.loop.remove_reader(fwd.sock.fileno())
        for guest in list(fwd.ports):
            self._leave_udp(fwd, guest)
        fwd.sock.close()

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
        peer_v4 = conn.family == socket.AF_INET or _is_mapped(peer[0])
        guest = fwd.guest_for(peer_v4, self.guest_addr6)
        if guest is None:
            self.stack.link.count("hostfwd.tcp_no_guest_addr6")
            _reset(conn)
            return
        remote = self._as_seen_by_guest(peer[0], peer_v4, len(guest) == 16)
        port = self._free_tcp_port(guest, fwd.guest_port, remote, peer[1])
        handle = TcpHandle()
        handle.sock = conn
        handle.fd = conn.fileno()
        flow = None
        if port is not None:
            flow = engine.open_to_guest(remote, port, guest, fwd.guest_port,
                                        self.loop.time(), host_handle=handle)
        if flow is None:
            self.stack.link.count("hostfwd.tcp_refused")
            _reset(conn)
            return
        self.stack.link.count("hostfwd.tcp_opened")
        self.attachment.schedule_flush()

    def _free_tcp_port(self, guest: bytes, guest_port: int, remote: bytes,
                       port: int) -> int | None:
        flows = self.stack.tcp.flows
        if (guest, guest_port, remote, port) not in flows:
            return port
        for _ in range(64):
            port = self._rng.randrange(1024, 65536)
            if (guest, guest_port, remote, port) not in flows:
                return port
        return None

    # ---- UDP --------------------------------------------------------------------------
    def _udp_ports_for(self, fwd: _Forward, guest: bytes) -> _UdpPorts:
        """The guest endpoint ``guest:guest_port`` this forward's socket feeds, made (with
        its permanent flow in the engine) when the first forward reaches it."""
        gkey = (guest, fwd.guest_port)
        ports = self._udp_ports.get(gkey)
        if ports is None or ports.closed:
            ports = _UdpPorts(self.loop)
            ports.socks.append(fwd.sock)
            ports.flow = self.stack.udp.add_forward(guest, fwd.guest_port, ports,
                                                    self.loop.time())
            self._udp_ports[gkey] = ports
        else:
            ports.socks.append(fwd.sock)
        if fwd.follow6 and len(guest) == 16:
            for old in [g for g in fwd.ports if len(g) == 16]:  # the guest's address changed
                self._leave_udp(fwd, old)
        fwd.ports[guest] = ports
        return ports

    def _leave_udp(self, fwd: _Forward, guest: bytes) -> None:
        """This forward's socket no longer feeds that guest endpoint."""
        ports = fwd.ports.pop(guest)
        if len(ports.socks) > 1:
            ports.forget(fwd.sock)
            return
        # The endpoint's last socket: its flow goes (the engine calls the attachment's
        # udp_close, which stops watching the socket: watch it again if it still serves).
        del self._udp_ports[(guest, fwd.guest_port)]
        self.stack.udp.remove_forward(ports.flow)
        ports.close()
        if self.forwards.get((fwd.proto, fwd.host_addr, fwd.host_port)) is fwd:
            self.loop.add_reader(fwd.sock.fileno(), self._on_udp_readable, fwd)

    def _on_udp_readable(self, fwd: _Forward) -> None:
        now = self.loop.time()
        sock = fwd.sock
        known = self.stack.link.guest_mac is not None
        # IPv4 to an IPv4 guest address (slirp4netns's one kind): one endpoint, served
        # inline; every other kind chooses its endpoint per datagram (_udp_datagram).
        simple = fwd.ports.get(fwd.guest4) if (
            fwd.guest4 is not None and sock.family == socket.AF_INET) else None
        host_datagram = self.stack.udp.host_datagram
        drained = errored = False  # rearm_reader unless drained without an error
        for read in range(_UDP_BATCH):
            try:
                data, peer = sock.recvfrom(_UDP_MAX)
            except (BlockingIOError, InterruptedError):
                drained = True
                if not read:  # woken with nothing to read: a POLLERR for the error queue
                    self._udp_errors(fwd, sock, now)
                    errored = True
                break
            except OSError:
                self._udp_errors(fwd, sock, now)
                errored = True
                continue
            if known and simple is not None:
                peers = simple.peers
                seen = peers.get(peer)
                if seen is None or seen[0] is not sock:
                    if len(peers) >= _MAX_UDP_PEERS:
                        peers.clear()
                    peers[peer] = (sock, peer)
                host_datagram(simple.flow, peer[0], peer[1], data, now)
            elif known:
                self._udp_datagram(fwd, peer, data, now)
            elif len(self._pending) - self._parked < _MAX_PENDING:
                self._when_guest_known(functools.partial(
                    self._late_datagram, fwd, peer, data), _ARP_GIVE_UP)
            else:
                self.stack.link.count("hostfwd.udp_no_guest_mac")
        if (errored or not drained) and fwd.sock is sock:
            rearm_reader(self.loop, sock.fileno(), self._on_udp_readable, fwd)
        self.attachment.schedule_flush()

    def _udp_errors(self, fwd: _Forward, sock: socket.socket, now: float) -> None:
        """ICMP errors for what the guest sent from this port (IP_RECVERR, which only
        IPv4 sockets ask for: their one endpoint is the IPv4 guest's)."""
        ports = fwd.ports.get(fwd.guest4) if fwd.guest4 is not None else None
        if ports is not None:
            self.attachment.host.udp_read_errors(ports.flow, sock, now)

    def _udp_datagram(self, fwd: _Forward, peer: Any, data: bytes, now: float) -> None:
        """One datagram from host ``peer`` into the guest endpoint it is meant for."""
        src_ip, src_port = peer[0], peer[1]
        if fwd.sock.family == socket.AF_INET and fwd.guest4 is not None:
            guest = fwd.guest4  # IPv4 to IPv4 (a datagram that waited for the MAC)
            seen_as = src_ip
        else:
            peer_v4 = fwd.sock.family == socket.AF_INET or _is_mapped(src_ip)
            found = fwd.guest_for(peer_v4, self.guest_addr6)
            if found is None:
                self.stack.link.count("hostfwd.udp_no_guest_addr6")
                return
            guest = found
            seen_as = self._udp_source(src_ip, peer_v4, len(guest) == 16)
        ports = fwd.ports.get(guest) or self._udp_ports_for(fwd, guest)
        peers = ports.peers
        key = (seen_as, src_port)
        known = peers.get(key)
        if known is None or known[0] is not fwd.sock or known[1] != peer:
            if len(peers) >= _MAX_UDP_PEERS:
                peers.clear()
            peers[key] = (fwd.sock, peer)
        self.stack.udp.host_datagram(ports.flow, seen_as, src_port, data, now)

    def _late_datagram(self, fwd: _Forward, peer: Any, data: bytes) -> None:
        if not self._closed and self.forwards.get(
                (fwd.proto, fwd.host_addr, fwd.host_port)) is fwd:
            self._udp_datagram(fwd, peer, data, self.loop.time())

    def _udp_source(self, ip: str, peer_v4: bool, guest_v6: bool) -> str:
        """The peer address to hand the UDP engine, which applies the IPv4 rules itself
        and shows a loopback peer as the gateway: a peer that must appear as the
        gateway is handed over as a loopback address (the replies find it again
        through ``_UdpPorts.peers``)."""
        if peer_v4:
            if guest_v6:
                return "::1"
            return ip[7:] if ip.startswith("::ffff:") else ip
        if not guest_v6:
            return "127.0.0.1"
        addr = ipv6.addr_from_str(ip.partition("%")[0])
        return "::1" if self._hidden6(addr) else ipv6.addr_to_str(addr)

    # ---- common -----------------------------------------------------------------------
    def _as_seen_by_guest(self, ip: str, peer_v4: bool = True, guest_v6: bool = False) -> bytes:
        """The source address the guest sees for host peer ``ip`` (module docstring)."""
        if peer_v4:
            addr = socket.inet_aton(ip[7:] if ip.startswith("::ffff:") else ip)
            if guest_v6:
                return self._gateway6
            if addr[0] == 127 or addr == b"\0\0\0\0" or self.stack.in_network(addr):
                return self.attachment.config.gateway
            return addr
        if not guest_v6:
            return self.attachment.config.gateway
        addr6 = ipv6.addr_from_str(ip.partition("%")[0])
        return self._gateway6 if self._hidden6(addr6) else addr6

    def _hidden6(self, addr: bytes) -> bool:
        """An IPv6 peer the guest could not answer directly: it appears as the gateway."""
        return (addr in (_LOOPBACK6, ipv6.UNSPECIFIED) or addr[:8] == self._prefix6
                or ipv6.is_link_local(addr) or ipv6.is_multicast(addr))

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
    family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
    if sock.family != family or sock.type != kind:
        raise ValueError(f"socket is {sock.family.name}/{sock.type.name}, not "
                         f"{family.name}/{socket.SocketKind(kind).name}")
    bound = sock.getsockname()[:2]  # IPv6: (host, port, flowinfo, scope id)
    if bound != (host_addr, host_port):
        raise ValueError(f"socket is bound to {bound[0]}:{bound[1]}, not "
                         f"{host_addr}:{host_port}")
    if kind == socket.SOCK_STREAM and \
            not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError("TCP socket is not listening")


def _takes_ipv4(sock: socket.socket) -> bool:
    """Whether IPv4 peers can reach this bound socket (IPv4, or a dual-stack ``::``)."""
    if sock.family == socket.AF_INET:
        return True
    return bool(sock.getsockname()[0] == "::"
                and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


def _is_mapped(ip: str) -> bool:
    """An IPv4 peer of a dual-stack IPv6 socket (``::ffff:a.b.c.d``)."""
    return ip.startswith("::ffff:") and "." in ip


def _reset(conn: socket.socket) -> None:
    """Close with an RST, as a port nobody listens on would answer."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def serve_api(attachment: Attachment, api: Callable[[Any, HostForwarder, str], Any],
              default_guest_addr: str) -> tuple[HostForwarder, Any]:
    """A port forwarder for ``attachment`` and the front end's API socket serving it
    (``--api-socket``): the one-process server's and the shared engine's.

    ``api`` is the front end's ``ServeSpec.api`` (typed loosely: spec.py's
    ``ApiFactory`` names this module); ``default_guest_addr``: where forwards go when
    a request names no guest address. If the socket cannot be made (OSError), the
    forwarder is closed again and the error raised."""
    forwarder = HostForwarder(attachment)
    try:
        return forwarder, api(attachment.loop, forwarder, default_guest_addr)
    except BaseException:
        forwarder.close()
        raise
