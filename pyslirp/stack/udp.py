"""UDP NAT: the guest's UDP flows carried over ordinary host UDP sockets.

Theory of operation
-------------------
A *flow* is one guest (address, port), as in libslirp's ``udp.c``: its first
datagram makes the runtime open one host socket (``host.udp_open``), and
every datagram from that guest port, whatever its destination, is sent from
that socket (``host.udp_send``). So the guest's port keeps one host port for
all its peers (endpoint-independent mapping, RFC 4787 REQ-1), which is what
STUN, QUIC migration and DNS resolvers that talk to several servers expect.

A guest socket with ``UDP_SEGMENT`` writes several datagrams in one call, and
over a TAP that offers USO (TUN_F_USO4/6) its kernel hands them to us as one
super-frame (vnet ``GSO_UDP_L4``, ``gso_size``): :meth:`UdpEngine.handle` gets
``segment`` and the host is asked to send that many datagrams, each
``segment`` bytes but the last (``host.udp_send(..., segment)``, one sendmsg
with ``UDP_SEGMENT`` in the runtime). The application's datagram boundaries
are kept exactly: never one datagram for the whole frame, never cut elsewhere.

Destinations go through the stack's address policy once per (flow,
destination) and the answer is cached in the flow: the gateway means the
host's loopback (unless ``disable_host_loopback``), the DNS address is not
ours (DNS to 10.0.2.3:53 never reaches this engine), anything the policy
refuses is silently dropped and counted, as slirp4netns does (the engine
issue asks for exactly that: with ``--disable-host-loopback`` UDP to the
gateway is dropped, while TCP gets ICMP net unreachable from the TCP engine).

The flow remembers which guest destination each host target stands for, so
a reply is sent to the guest from the address the guest used. A reply from
a source the guest never sent to (filtering is endpoint-independent too, as
libslirp's: any datagram that reaches the host socket is delivered) appears
as itself, except that a loopback source appears as the gateway, or is
dropped when host loopback is disabled (127.0.0.1 as a source would be a
martian in the guest).

ICMP errors the runtime reads from the host socket (``IP_RECVERR``) are
reported to the guest as ICMP errors (RFC 792; RFC 1122 section 3.2.2.1
says UDP must pass them up) quoting a reconstructed copy of the guest's
datagram (IP header plus UDP header; the payload is not kept): the guest's
kernel matches the quote to its socket by addresses and ports only, so a
``connect``-ed socket sees ECONNREFUSED or EHOSTUNREACH as on a real link.
Port unreachable comes from the destination itself (it is the host that
answers so); every other error from the gateway (it is "a router on the
way"). Fragmentation needed is not passed on: the host socket fragments for
itself, so the guest's path MTU to us is not what failed. These errors are
rate-limited as Linux limits the ICMP errors it sends (``icmp_msgs_per_sec``
/ ``icmp_msgs_burst``: ``ICMP_ERROR_RATE`` per second, bursts of
``ICMP_ERROR_BURST``, one bucket for the engine); past it an error is dropped
and counted (``drop.udp.icmp_rate``), as a router would not send it. A guest
sending to ever new closed ports then gets no message per datagram, and a
traceroute or a refused ``connect``-ed socket (one error each) is untouched.
Packet too big (IPv6) is not limited, as in Linux: it carries the path MTU.

A reply that fits the link MTU is built in place (headers in one buffer, the
payload not copied) and, when the link has offloads, its checksum is left to
the guest's kernel (vnet NEEDS_CSUM) as the TCP engine does. Replies larger
than the link MTU are sent as IPv4 fragments
(:func:`pyslirp.stack.frag.send_fragmented`): DNS over UDP with EDNS0 and
QUIC probes are legitimately large, and the guest reassembles them.

Lifetime: a flow expires after ``IDLE_TIMEOUT`` (240 s, libslirp's
SO_EXPIRE) without a datagram in either direction, or ``DNS_IDLE_TIMEOUT``
(10 s, libslirp's SO_EXPIREFAST) if it has only ever sent to port 53, since
resolvers use a fresh port per query and would otherwise hold hundreds of
sockets. A flow the host side never answered expires after
``UNREPLIED_TIMEOUT`` (30 s, conntrack's unreplied UDP timeout) instead, so
a flood of new flows leaves the table within seconds, not minutes. Expiry is
checked lazily: the timer is armed once for the flow's earliest possible
expiry and re-armed from ``last_active`` when it fires, so a datagram costs
no heap operation.

Bounds: at most ``max_flows`` flows and ``new_flows_per_second`` new flows
per second (token bucket, burst of one second's worth), so a guest cannot
exhaust the host's file descriptors or ports; excess datagrams are dropped
and counted (``drop.udp.*`` in ``link.counters``). When the table is full a
new flow takes the place of the oldest flow never answered (as conntrack's
early drop: ``udp.flows_evicted``); flows that got a reply are kept, and
only when all flows did is the new one refused (``drop.udp.flow_limit``). A datagram from an
existing flow to a destination the flow has not sent to (or has forgotten,
past ``MAX_PEERS_PER_FLOW``) passes a second bucket first
(``NetConfig.new_flow_rate``/``new_flow_burst``, :mod:`pyslirp.stack.admission`),
so one socket sending to ever new ports costs no host ``sendto`` and no ICMP
error back. Once the bucket refuses such a flow, the flow is listed in
:attr:`UdpEngine.shedding` until the bucket has a token again, and the runtime
offers each raw frame to :meth:`UdpEngine.shed` before the parse: a datagram of
that flow to a destination it has not sent to is dropped from a few byte reads
(counted as the whole path would), everything else goes the normal way. A
flood from one socket then costs ~1 us a frame instead of ~3, which keeps the
TAP reader ahead of the guest's sender (tests/stack/test_udp_shedding.py: the
same host calls and counters as without it).

A flood still costs a TAP read per frame that way, and its frames fill the TAP's
queue ahead of the guest's other frames (a download's ACKs wait behind them, or
are dropped with them). So while a flow floods (its datagrams to new destinations
past ``FLOOD_ENGAGE`` times the admission rate: admission.FloodWatch),
:meth:`UdpEngine.review_flood`, reviewed by the runtime every
``FLOOD_REVIEW_INTERVAL``, describes a :class:`FloodFilter`: the device (the TAP,
with a socket filter: :mod:`pyslirp.runtime.framefilter`) drops that flow's
datagrams in the guest's kernel, unread, but for a random ``keep`` share sized
to about ``FLOOD_SAMPLE`` times the admission rate, which is refused or admitted
as before (the flow gets every token it would have got) and measures the flood.
The frames never read are counted as an estimate (``drop.udp.flood_filtered``);
the filter comes off when the flood falls under ``FLOOD_RELEASE`` times the rate
(tests/stack/test_udp_flood_filter.py, tests/runtime/test_tap_filter.py).

Port forwarding (inbound) rides on the same flows: :meth:`UdpEngine.add_forward`
pins a flow for the forwarded guest port on the runtime's bound host socket
(pyslirp.runtime.hostfwd); it never expires, admits loopback peers (as the
gateway, as are peers with an address on the virtual network) and sends the
guest's replies back to the exact peer.

IPv6 (:meth:`UdpEngine.handle6`) goes through the same flows: a flow's
guest address is 16 bytes, so its key never equals an IPv4 flow's with the
same port, and the runtime opens an IPv6 host socket for it (``flow.v6``).
Replies are framed with the IPv6 template (the checksum is mandatory: with
offloads the guest's kernel finishes it, otherwise it is computed here). A
reply from the host's ``::1`` appears as the gateway ``fd00::2``. ICMPv6
errors the host socket reads (``IPV6_RECVERR``) reach the guest as ICMPv6
errors (RFC 4443) quoting the reconstructed datagram, as for IPv4: port
unreachable from the destination, other unreachables and time exceeded from
the gateway; and, unlike IPv4's fragmentation needed, packet too big with
the host's path MTU when it is below the link MTU: an IPv6 router never
fragments, so a guest doing path MTU discovery (QUIC, ``IPV6_DONTFRAG``)
learns the real path this way, and its kernel fragments to us, which the
stack reassembles. Replies larger than the link MTU are sent as IPv6
fragments (:func:`pyslirp.stack.frag.send_fragmented6`). Not done for IPv6
(yet): port forwarding.

Not done: UDP to broadcast or multicast addresses (dropped and counted:
nothing on the host side would be the right receiver), UDP-Lite.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from pyslirp.stack.admission import FloodWatch, TokenBucket
from pyslirp.stack.config import NetConfig
from pyslirp.stack.frag import send_fragmented, send_fragmented6
from pyslirp.stack.host import Buffer, HostPort, Policy
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp, icmpv6, ipv4, ipv6, vnet
from pyslirp.wire import udp as wire_udp
from pyslirp.wire.checksum import checksum, finish, partial_sum, pseudo_header_sum
from pyslirp.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6
from pyslirp.wire.frame import ETH_IPV4_UDP, ETH_IPV6_UDP, IPV6_VERSION_WORD, L4_START6
from pyslirp.wire.ipv4 import PROTO_ICMP, PROTO_UDP, Ipv4Packet

IDLE_TIMEOUT = 240.0
DNS_IDLE_TIMEOUT = 10.0
#: A flow whose host socket never received anything (conntrack's UDP "unreplied").
UNREPLIED_TIMEOUT = 30.0
DEFAULT_MAX_FLOWS = 4096
DEFAULT_NEW_FLOWS_PER_SECOND = 1000.0
#: Guest destinations (and host sources) remembered per flow before the cache is reset.
MAX_PEERS_PER_FLOW = 256
#: ICMP errors to the guest per second and the burst allowed: Linux's
#: ``net.ipv4.icmp_msgs_per_sec`` and ``icmp_msgs_burst`` defaults.
ICMP_ERROR_RATE = 1000.0
ICMP_ERROR_BURST = 50
#: The largest UDP payload one IPv4 packet can carry (65535 - 20 - 8).
MAX_PAYLOAD = 65507
_DNS_PORT = 53
_DHCP_SERVER_PORT = 67
#: A run of datagrams sent with one segmented send (UDP_SEGMENT): at most this many
#: (the kernel's UDP_MAX_SEGMENTS is 64 on older kernels) and bytes (one IP packet).
_RUN_DATAGRAMS = 64
_RUN_BYTES = 65000
#: IPv4 flags_frag bits that make a packet a fragment (MF, the offset).
_FRAGMENT_BITS = ipv4.FLAG_MF | ipv4.OFFSET_MASK

_UDP_HEADER = struct.Struct("!HHHH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
#: Ethernet + IPv4 (20 bytes, no options) + UDP headers of a frame to the guest.
_FRAME = ETH_IPV4_UDP
_FRAME_LEN = _FRAME.size
_IP_START = 14
_IP_CSUM = _IP_START + 10
_L4_START = _IP_START + ipv4.MIN_HEADER_LEN
_UDP_CSUM = _L4_START + 6
_IP_UDP_LEN = ipv4.MIN_HEADER_LEN + wire_udp.HEADER_LEN
_VNET_CSUM = vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, _FRAME_LEN, 0, _L4_START, 6)
#: The same for IPv6 (40-byte header, no extension headers).
_FRAME6 = ETH_IPV6_UDP
_FRAME6_LEN = _FRAME6.size
_UDP_CSUM6 = L4_START6 + 6
_IP6_UDP_LEN = ipv6.HEADER_LEN + wire_udp.HEADER_LEN
_VNET_CSUM6 = vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, _FRAME6_LEN, 0, L4_START6, 6)
_LOOPBACK6 = bytes(15) + b"\x01"
_UNSPECIFIED6 = bytes(16)

_Target = tuple[str, int]
_Origin = tuple[bytes, int]

#: Flooding flows one filter names (any others are shed from the frames read).
FLOOD_FILTER_FLOWS = 8


@dataclass(frozen=True)
class FloodFilter:
    """Datagrams a device may drop before it reads them, while flows flood.

    It covers IPv4 UDP datagrams (plain: no fragment, no IP options) from one of
    ``flows`` (raw guest address + port, as :attr:`UdpEngine.shedding` keys them)
    to anything but ``spared`` addresses (the DNS forwarder, the broadcast
    address), multicast or the DHCP server port: of those the device lets each
    through with probability ``keep`` and drops the rest unread. Everything else
    reaches the stack as before.
    """

    flows: tuple[bytes, ...]
    keep: float
    spared: tuple[bytes, ...]


class UdpFlow:
    """One guest (address, port) and the host socket the runtime keeps for it.

    ``host_handle`` is the runtime's to use (e.g. its socket object).
    """

    __slots__ = ("engine", "guest_ip", "guest_port", "dns_only", "last_active",
                 "targets", "origins", "closed", "timer_deadline", "host_handle", "forward",
                 "v6", "replied")

    def __init__(self, engine: UdpEngine, guest_ip: bytes, guest_port: int,
                 now: float) -> None:
        self.engine = engine
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        #: True while every destination so far was port 53 (short idle timeout).
        self.dns_only = True
        self.last_active = now
        #: Guest destination -> host target (the policy's answer, cached).
        self.targets: dict[_Origin, _Target] = {}
        #: Host address -> the address the guest sees for it.
        self.origins: dict[_Target, _Origin] = {}
        self.closed = False
        self.timer_deadline: float | None = None
        self.host_handle: object = None
        #: A port forward's flow (:meth:`UdpEngine.add_forward`): never expires.
        self.forward = False
        #: An IPv6 flow (16-byte guest address): the runtime opens an IPv6 socket.
        self.v6 = len(guest_ip) == 16
        #: The host side answered (a datagram arrived): long timeout, never evicted.
        self.replied = False

    @property
    def key(self) -> _Origin:
        return (self.guest_ip, self.guest_port)

    def idle_timeout(self) -> float:
        if self.dns_only:
            return DNS_IDLE_TIMEOUT
        return IDLE_TIMEOUT if self.replied else UNREPLIED_TIMEOUT

    def on_timer(self, now: float) -> None:
        self.engine._check_expiry(self, now)

    def __repr__(self) -> str:
        addr = ipv6.addr_to_str(self.guest_ip) if self.v6 else ipv4.addr_to_str(self.guest_ip)
        return f"<UdpFlow {addr}:{self.guest_port}>"


class UdpEngine:
    """The UDP NAT for one guest link. Sans-I/O: see :mod:`pyslirp.stack`."""

    __slots__ = ("config", "link", "host", "timers", "policy", "flows", "max_flows",
                 "_unreplied", "_new_flows", "_new_destinations", "_icmp_errors", "_gateway",
                 "_gateway6",
                 "_broadcast", "_loopback_ok", "shedding", "_shed_until", "_dns", "_eth",
                 "batching", "pending", "flood_filter", "flood_watch", "_flooding",
                 "_destinations_admitted")

    def __init__(self, config: NetConfig, link: Link, host: HostPort, timers: Timers,
                 policy: Policy, *, max_flows: int = DEFAULT_MAX_FLOWS,
                 new_flows_per_second: float = DEFAULT_NEW_FLOWS_PER_SECOND) -> None:
        self.config = config
        self.link = link
        self.host = host
        self.timers = timers
        self.policy = policy
        self.flows: dict[_Origin, UdpFlow] = {}
        #: Flows the host side has not answered yet, oldest first: the ones a new
        #: flow may take the place of when the table is full.
        self._unreplied: dict[_Origin, UdpFlow] = {}
        self.max_flows = max_flows
        self._new_flows = TokenBucket(new_flows_per_second)
        self._new_destinations = TokenBucket(config.new_flow_rate, config.new_flow_burst)
        self._icmp_errors = TokenBucket(ICMP_ERROR_RATE, ICMP_ERROR_BURST)
        self._gateway = config.gateway
        self._gateway6 = config.gateway6
        self._broadcast = config.broadcast
        self._loopback_ok = not config.disable_host_loopback
        #: Flows refused a new destination, while the bucket is empty: the raw key
        #: (guest address + port, as in the frame) -> (flow, when a token is back).
        #: The device tests it per frame (see shed); empty unless a flow floods.
        self.shedding: dict[bytes, tuple[UdpFlow, float]] = {}
        #: The latest of those times: past it, every entry is stale at once.
        self._shed_until = 0.0
        #: What the device drops unread while flows flood (see review_flood), or None.
        self.flood_filter: FloodFilter | None = None
        self.flood_watch = FloodWatch(config.new_flow_rate)
        #: Keys of the flows refused a new destination since the last review.
        self._flooding: dict[bytes, None] = {}
        #: New destinations admitted so far (with the refusals: what a filter samples).
        self._destinations_admitted = 0
        self._dns = config.dns
        self._eth = vnet.HEADER_LEN if link.vnet_hdr else 0
        #: Hold the guest's datagrams for one segmented host send per run of
        #: equal-size datagrams of one flow to one target (UDP GSO), until
        #: :meth:`send_pending`. The Stack turns it on: its ``flush`` ends each
        #: batch of frames. Off, every datagram is sent as it comes.
        self.batching = False
        #: The open run: [flow, target, datagram size (negated once a shorter last
        #: datagram closed it), [payloads], their count], or None.
        self.pending: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.flows)

    # ---- guest -> host -----------------------------------------------------------
    def handle(self, ip: Ipv4Packet, now: float, checksum_verified: bool,
               segment: int = 0) -> None:
        """A UDP packet from the guest (whole, not a fragment) to NAT to the host.

        ``segment``: the packet is a USO super-frame of datagrams of that size
        (the last may be shorter; see :meth:`_from_guest`)."""
        link = self.link
        if ip.flags_frag & _FRAGMENT_BITS:
            link.count("drop.udp.fragment")
            return
        src, dst = ip.src, ip.dst
        # The UDP header inline (wire.udp.UdpDatagram's checks, fewer calls: this is
        # the per-datagram path, guarded by tests/hotpath_budget.json).
        data = ip.payload
        size = len(data)
        if size < wire_udp.HEADER_LEN:
            link.count("drop.malformed.udp")
            return
        sport, dport, length, csum = _UDP_HEADER.unpack_from(data)
        if length < wire_udp.HEADER_LEN or length > size:
            link.count("drop.malformed.udp")
            return
        if length != size:
            data = data[:length]
        if not checksum_verified and csum and partial_sum(
                data, pseudo_header_sum(src, dst, PROTO_UDP, length)):
            link.count("drop.malformed.udp")
            return
        if dst[0] >= 224 or dst == self._broadcast:
            link.count("drop.udp.broadcast")
            return
        if sport == 0 or dport == 0 or src[0] == 0 or src[0] >= 224:
            link.count("drop.udp.bad_address")
            return
        self._from_guest(src, sport, dst, dport, data[wire_udp.HEADER_LEN:], now, segment)

    def handle6(self, ip: ipv6.Ipv6Packet, dgram: wire_udp.UdpDatagram, now: float,
                segment: int = 0) -> None:
        """A UDP/IPv6 datagram from the guest (parsed and its checksum checked by the
        stack, which also kept multicast away) to NAT to the host."""
        src = ip.src
        sport, dport = dgram.src_port, dgram.dst_port
        if sport == 0 or dport == 0 or src == _UNSPECIFIED6 or src[0] == 0xFF:  # multicast
            self.link.count("drop.udp.bad_address")
            return
        self._from_guest(src, sport, ip.dst, dport, dgram.buf[wire_udp.HEADER_LEN:], now,
                         segment)

    def _from_guest(self, src: bytes, sport: int, dst: bytes, dport: int, payload: Buffer,
                    now: float, segment: int = 0) -> None:
        """Send a guest's datagram from its flow's host socket (IPv4 and IPv6 alike).

        With ``segment`` the payload is several datagrams laid end to end, each
        ``segment`` bytes but the last (a USO super-frame); the host sends them
        as that many datagrams (``udp_send``'s ``segment``), never as one."""
        flow = self.flows.get((src, sport))
        dkey = (dst, dport)
        if flow is None:
            target = self._target(dst, dport)
            if target is None:
                return
            flow = self._new_flow(src, sport, dport, now)
            if flow is None:
                return
            self._remember(flow, dkey, target)
        else:
            target = flow.targets.get(dkey)
            if target is None:
                # A new destination is a new flow in conntrack's sense: admission first.
                if not self._new_destinations.take(now):
                    self.link.count("drop.udp.new_destination_rate")
                    self._shed_new_destinations(flow, now)
                    return
                self._destinations_admitted += 1
                target = self._target(dst, dport)
                if target is None:
                    return
                self._remember(flow, dkey, target)
        if dport != _DNS_PORT:
            flow.dns_only = False
        flow.last_active = now
        run = self.pending
        if run is not None:
            if run[0] is flow and run[1] == target and not segment and self._extend(run, payload):
                return
            self.send_pending()  # the open run goes first: the guest's order is kept
        size = len(payload)
        if segment:
            if segment < size:
                self.host.udp_send(flow, target, [payload], segment)
                return
        elif self.batching and 0 < size <= _RUN_BYTES // 2:
            self.pending = [flow, target, size, [payload], 1]
            return
        self.host.udp_send(flow, target, payload)

    @staticmethod
    def _extend(run: list[Any], payload: Buffer) -> bool:
        """Add ``payload`` to the open run if one segmented send can carry it: the
        same size as the run's datagrams, or shorter as the last one."""
        size: int = run[2]
        count: int = run[4]
        n = len(payload)
        if n > size or n == 0 or count >= _RUN_DATAGRAMS or (count + 1) * size > _RUN_BYTES:
            return False
        if n < size:
            run[2] = -size  # a shorter datagram ends the run: nothing may follow it
        run[3].append(payload)
        run[4] = count + 1
        return True

    def send_pending(self) -> None:
        """Send the open run of datagrams (:attr:`batching`): one datagram as itself,
        more with one segmented ``udp_send``. ``Stack.flush`` calls this."""
        run = self.pending
        if run is None:
            return
        self.pending = None
        flow, target, size, parts, count = run
        if flow.closed:
            return  # its socket is gone, as for a datagram sent after the close
        if count == 1:
            self.host.udp_send(flow, target, parts[0])
        else:
            self.host.udp_send(flow, target, parts, abs(size))

    def _shed_new_destinations(self, flow: UdpFlow, now: float) -> None:
        """Until the bucket has a token again, let :meth:`shed` refuse the flow's
        datagrams to new destinations from the raw frame (IPv4 flows only)."""
        if len(flow.guest_ip) == 4:
            bucket = self._new_destinations
            # At least past ``now`` itself: the bucket refuses every take at the time
            # of a refusal, however close to 1 its tokens are (rounding would make
            # ``until`` equal ``now`` then).
            until = max(now + (1.0 - bucket.tokens) / bucket.rate, math.nextafter(now, math.inf))
            key = flow.guest_ip + _U16.pack(flow.guest_port)
            self.shedding[key] = (flow, until)
            self._flooding[key] = None
            self._shed_until = max(self._shed_until, until)

    def review_flood(self, now: float) -> bool:
        """Decide :attr:`flood_filter` from the datagrams to new destinations (refused or
        admitted) since the last review; True if it changed (the runtime then gives it
        to the device).

        The runtime calls this once when :attr:`shedding` fills (which only takes the
        baseline), then every ``FLOOD_REVIEW_INTERVAL`` while the watch's ``flood_rate``
        is not 0 or a filter is on, for devices that can drop frames unread (the TAP, with a
        socket filter). Shedding in Python still costs a TAP read and a few byte reads
        per frame, and the flood's frames still fill the TAP's queue ahead of every
        other flow's (a download's ACKs wait behind them, or are dropped with them when
        the queue is full); dropped by the guest's kernel, they cost neither. The
        frames let through (``keep``) are refused or admitted as before, so the flow
        gets every admission token it would have got; each datagram to a new
        destination seen while the filter is on stands for ``1 / keep``, and the ones
        never read are counted as the estimate ``drop.udp.flood_filtered`` (the kernel
        counts them only among the TAP's transmit drops). A flow's datagrams to
        destinations it already knows are sampled too: a flow sending to this many new
        destinations a second has its known ones churned out of its cache
        (MAX_PEERS_PER_FLOW) anyway."""
        if now >= self._shed_until:
            self.shedding.clear()  # stale (a device that never calls shed: QEMU's dgram)
        seen = (self.link.counters.get("drop.udp.new_destination_rate", 0)
                + self._destinations_admitted)
        flows = tuple(sorted(self._flooding))[:FLOOD_FILTER_FLOWS]
        self._flooding.clear()
        unread = self.flood_watch.review(now, seen, bool(flows))
        if unread:
            self.link.count("drop.udp.flood_filtered", unread)
        keep = self.flood_watch.keep
        wanted = None if keep is None else FloodFilter(flows, keep, (self._dns, self._broadcast))
        if wanted == self.flood_filter:
            return False
        if self.flood_filter is None:
            self.link.count("udp.flood_filter.engaged")
        self.flood_filter = wanted
        return True

    def shed(self, frame: bytes, now: float) -> bool:
        """True if ``frame`` (a whole guest frame, as read) is a datagram the NAT would
        refuse anyway: from a flow in :attr:`shedding`, to a destination it has not
        sent to, before the admission bucket has a token again. Counted as the NAT
        counts it. Anything unusual (not plain IPv4/UDP, a fragment, IP options, DNS,
        DHCP, broadcast, a known destination) is left to :meth:`Stack.receive_frame`.

        The runtime calls this per frame only while :attr:`shedding` is non-empty,
        before it builds a memoryview or parses anything: under a flood of datagrams
        to ever new ports it costs a few byte reads per frame, where the whole parse
        cost ~3 us and let the guest outrun the TAP reader (its kernel then drops the
        frames of every flow, well-behaved ones too)."""
        if now >= self._shed_until:
            self.shedding.clear()  # tokens are back for every flow: the NAT decides
            return False
        o = self._eth
        if (len(frame) < o + 42 or frame[o + 12] != 8 or frame[o + 13] != 0
                or frame[o + 14] != 0x45 or frame[o + 23] != PROTO_UDP
                or frame[o + 20] & 0x3F or frame[o + 21]):
            return False
        key = frame[o + 26:o + 30] + frame[o + 34:o + 36]
        entry = self.shedding.get(key)
        if entry is None:
            return False
        flow, until = entry
        if now >= until or flow.closed:
            del self.shedding[key]
            return False
        dst = frame[o + 30:o + 34]
        dport = frame[o + 36] << 8 | frame[o + 37]
        if (dst, dport) in flow.targets or dst == self._dns or dst[0] >= 224 or (
                dst == self._broadcast or dport == _DHCP_SERVER_PORT):
            return False
        self.link.count("drop.udp.new_destination_rate")
        return True

    def _target(self, dst: bytes, dport: int) -> _Target | None:
        targets = self.policy(dst, dport)
        if targets:
            return targets[0]
        self.link.count("drop.udp.policy")
        return None

    @staticmethod
    def _remember(flow: UdpFlow, dkey: _Origin, target: _Target) -> None:
        if len(flow.targets) >= MAX_PEERS_PER_FLOW:
            flow.targets.clear()
            flow.origins.clear()
        flow.targets[dkey] = target
        flow.origins[target] = dkey

    def _new_flow(self, src: bytes, sport: int, dport: int, now: float) -> UdpFlow | None:
        link = self.link
        full = len(self.flows) >= self.max_flows
        if full and not self._unreplied:
            link.count("drop.udp.flow_limit")
            return None
        if not self._new_flows.take(now):
            link.count("drop.udp.flow_rate")
            return None
        if full:
            self._evict_oldest_unreplied()
        flow = UdpFlow(self, src, sport, now)
        flow.dns_only = dport == _DNS_PORT
        if not self.host.udp_open(flow):
            link.count("drop.udp.open_failed")
            return None
        self.flows[(src, sport)] = flow
        self._unreplied[(src, sport)] = flow
        link.count("udp.flows_opened")
        self.timers.schedule(flow, now + flow.idle_timeout())
        return flow

    # ---- host -> guest -----------------------------------------------------------
    def host_datagram(self, flow: UdpFlow, src_ip: str, src_port: int, data: Buffer,
                      now: float) -> None:
        """A datagram the flow's host socket received from ``src_ip:src_port``."""
        link = self.link
        if flow.closed:
            link.count("drop.udp.closed_flow")
            return
        size = len(data)
        if size > MAX_PAYLOAD:
            link.count("drop.udp.oversize")
            return
        origin = flow.origins.get((src_ip, src_port))
        if origin is None:
            origin = self._origin(flow, src_ip, src_port)
            if origin is None:
                link.count("drop.udp.loopback_source")
                return
        flow.last_active = now
        if not flow.replied:
            self._mark_replied(flow)
        if flow.v6:
            if size + _IP6_UDP_LEN <= link.mtu:
                self._send_whole6(flow, origin, data, size)
            else:
                datagram = wire_udp.build6(origin[0], origin[1], flow.guest_ip,
                                           flow.guest_port, data)
                send_fragmented6(link, origin[0], flow.guest_ip, PROTO_UDP, datagram)
            return
        if size + _IP_UDP_LEN <= link.mtu:
            self._send_whole(flow, origin, data, size)
            return
        datagram = wire_udp.build(origin[0], origin[1], flow.guest_ip, flow.guest_port, data)
        send_fragmented(link, origin[0], flow.guest_ip, PROTO_UDP, datagram)

    def host_datagrams(self, flow: UdpFlow, src_ip: str, src_port: int, datagrams: list[Buffer],
                       now: float) -> None:
        """Datagrams the flow's host socket received back to back from one peer, each
        the size of the first but the last (which may be shorter): over a TAP that
        takes USO (``link.uso``) super-frames the guest's kernel cuts into exactly
        these datagrams (vnet GSO_UDP_L4, gso_size the first's size; at most
        ``_RUN_DATAGRAMS`` and one IPv4 packet each); otherwise one frame each."""
        link = self.link
        size = len(datagrams[0])
        if (not link.uso or flow.v6 or flow.closed or size == 0
                or size + _IP_UDP_LEN > link.mtu):
            for data in datagrams:
                self.host_datagram(flow, src_ip, src_port, data, now)
            return
        origin = flow.origins.get((src_ip, src_port))
        if origin is None:
            origin = self._origin(flow, src_ip, src_port)
            if origin is None:
                link.count("drop.udp.loopback_source", len(datagrams))
                return
        flow.last_active = now
        if link.guest_mac is None:
            link.count("drop.tx.no_guest_mac", len(datagrams))
            return
        step = min(_RUN_DATAGRAMS, MAX_PAYLOAD // size)
        for start in range(0, len(datagrams), step):
            chunk = datagrams[start:start + step]
            if len(chunk) == 1:
                self._send_whole(flow, origin, chunk[0], len(chunk[0]))
            else:
                self._send_segmented(flow, origin, chunk, size)

    def _send_segmented(self, flow: UdpFlow, origin: _Origin, datagrams: list[Buffer],
                        size: int) -> None:
        """One USO super-frame of ``datagrams`` (``size`` bytes each but the last)."""
        link = self.link
        mac = link.guest_mac
        assert mac is not None
        src, sport = origin
        dst = flow.guest_ip
        ulen = wire_udp.HEADER_LEN + sum(len(d) for d in datagrams)
        off = vnet.HEADER_LEN
        head = bytearray(off + _FRAME_LEN)
        head[:off] = vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, _FRAME_LEN, size,
                                _L4_START, 6)
        # The UDP length and pseudo-header sum are the whole frame's: the kernel
        # rewrites both per segment when it cuts (__udp_gso_segment).
        _FRAME.pack_into(head, off, mac, link.our_mac, ETHERTYPE_IPV4,
                         0x45, 0, ipv4.MIN_HEADER_LEN + ulen, link.next_ip_id(), ipv4.FLAG_DF,
                         64, PROTO_UDP, 0, src, dst, sport, flow.guest_port, ulen,
                         pseudo_header_sum(src, dst, PROTO_UDP, ulen))
        view = memoryview(head)
        _U16.pack_into(head, off + _IP_CSUM, checksum(view[off + _IP_START:off + _L4_START]))
        link.send_frame((head, *datagrams))
        link.count("udp.segmented_to_guest")

    def _send_whole(self, flow: UdpFlow, origin: _Origin, data: Buffer, size: int) -> None:
        """The hot path: one frame, headers in one buffer, the payload not copied.

        With offloads the UDP checksum is left to the guest's kernel (vnet
        NEEDS_CSUM, the field holding the pseudo-header sum), as TCP does.
        """
        link = self.link
        mac = link.guest_mac
        if mac is None:
            link.count("drop.tx.no_guest_mac")
            return
        src, sport = origin
        dst = flow.guest_ip
        ulen = wire_udp.HEADER_LEN + size
        pseudo = pseudo_header_sum(src, dst, PROTO_UDP, ulen)
        off = vnet.HEADER_LEN if link.vnet_hdr else 0
        head = bytearray(off + _FRAME_LEN)
        offload = link.offload
        _FRAME.pack_into(head, off, mac, link.our_mac, ETHERTYPE_IPV4,
                         0x45, 0, ipv4.MIN_HEADER_LEN + ulen, link.next_ip_id(), ipv4.FLAG_DF,
                         64, PROTO_UDP, 0, src, dst,
                         sport, flow.guest_port, ulen, pseudo if offload else 0)
        view = memoryview(head)
        _U16.pack_into(head, off + _IP_CSUM, checksum(view[off + _IP_START:off + _L4_START]))
        if offload:
            head[:off] = _VNET_CSUM
        else:
            total = partial_sum(data, partial_sum(view[off + _L4_START:], pseudo))
            _U16.pack_into(head, off + _UDP_CSUM, finish(total))
        link.send_frame((head, data))

    def _send_whole6(self, flow: UdpFlow, origin: _Origin, data: Buffer, size: int) -> None:
        """:meth:`_send_whole` over IPv6 (no IP header checksum; the UDP one is mandatory)."""
        link = self.link
        mac = link.guest_mac
        if mac is None:
            link.count("drop.tx.no_guest_mac")
            return
        src, sport = origin
        dst = flow.guest_ip
        ulen = wire_udp.HEADER_LEN + size
        pseudo = ipv6.pseudo_header_sum(src, dst, PROTO_UDP, ulen)
        off = vnet.HEADER_LEN if link.vnet_hdr else 0
        head = bytearray(off + _FRAME6_LEN)
        offload = link.offload
        _FRAME6.pack_into(head, off, mac, link.our_mac, ETHERTYPE_IPV6, IPV6_VERSION_WORD, ulen,
                          PROTO_UDP, 64, src, dst, sport, flow.guest_port, ulen,
                          pseudo if offload else 0)
        if offload:
            head[:off] = _VNET_CSUM6
        else:
            total = partial_sum(data, partial_sum(memoryview(head)[off + L4_START6:], pseudo))
            _U16.pack_into(head, off + _UDP_CSUM6, finish(total) or 0xFFFF)
        link.send_frame((head, data))

    def _origin(self, flow: UdpFlow, src_ip: str, src_port: int) -> _Origin | None:
        """The guest-side address of host address ``src_ip:src_port`` (None: hide it)."""
        origin = flow.origins.get((src_ip, src_port))
        if origin is not None:
            return origin
        if flow.v6:
            return self._origin6(flow, src_ip, src_port)
        try:
            addr = ipv4.addr_from_str(src_ip)
        except OSError:
            return None
        if addr[0] == 127:
            # A host peer of a port forward is let in even without host loopback,
            # as libslirp does: the guest answers it, never reaches out to it.
            if not self._loopback_ok and not flow.forward:
                return None
            addr = self._gateway
        elif flow.forward and IPv4Address(addr) in self.config.network:
            # A host peer whose address is on the virtual network (a nested setup)
            # would be looked for on the link; it talks through the gateway instead.
            addr = self._gateway
        origin = (addr, src_port)
        if len(flow.origins) >= MAX_PEERS_PER_FLOW:
            flow.targets.clear()
            flow.origins.clear()
        flow.origins[(src_ip, src_port)] = origin
        if flow.forward:
            # The guest's reply goes back to exactly this peer (127.0.0.5 too).
            flow.targets[origin] = (src_ip, src_port)
        return origin

    def _origin6(self, flow: UdpFlow, src_ip: str, src_port: int) -> _Origin | None:
        try:
            addr = ipv6.addr_from_str(src_ip.partition("%")[0])
        except OSError:
            return None
        if addr == _LOOPBACK6:
            if not self._loopback_ok and not flow.forward:  # as for IPv4 (_origin)
                return None
            addr = self._gateway6
        origin = (addr, src_port)
        if len(flow.origins) >= MAX_PEERS_PER_FLOW:
            flow.targets.clear()
            flow.origins.clear()
        flow.origins[(src_ip, src_port)] = origin
        if flow.forward:
            flow.targets[origin] = (src_ip, src_port)
        return origin

    def host_error(self, flow: UdpFlow, dst: tuple[str, int], icmp_type: int, icmp_code: int,
                   now: float, info: int = 0) -> None:
        """The host socket got an ICMP error for what it sent to ``dst``; tell the guest.

        For an IPv6 flow ``icmp_type``/``icmp_code`` are ICMPv6 ones and ``info`` is the
        MTU of a packet too big (the error queue's ``ee_info``)."""
        link = self.link
        if flow.closed:
            link.count("drop.udp.closed_flow")
            return
        if flow.v6:
            self._host_error6(flow, dst, icmp_type, icmp_code, info, now)
            return
        if icmp_type not in (icmp.DEST_UNREACH, icmp.TIME_EXCEEDED) or (
                icmp_type == icmp.DEST_UNREACH and icmp_code == icmp.FRAG_NEEDED):
            link.count("drop.udp.host_error_ignored")
            return
        if not self._icmp_errors.take(now):
            link.count("drop.udp.icmp_rate")
            return
        origin = self._origin(flow, dst[0], dst[1])
        if origin is None:
            link.count("drop.udp.loopback_source")
            return
        # What the guest sent, as far as its kernel looks: addresses and ports.
        quote = bytearray(ipv4.MIN_HEADER_LEN + wire_udp.HEADER_LEN)
        ipv4.build_header(quote, 0, flow.guest_ip, origin[0], PROTO_UDP, wire_udp.HEADER_LEN,
                          flags=0)
        _UDP_HEADER.pack_into(quote, ipv4.MIN_HEADER_LEN, flow.guest_port, origin[1],
                              wire_udp.HEADER_LEN, 0)
        message = icmp.build_error(icmp_type, icmp_code, quote)
        by_destination = icmp_type == icmp.DEST_UNREACH and icmp_code == icmp.PORT_UNREACH
        sender = origin[0] if by_destination else self._gateway
        link.send_ipv4(sender, flow.guest_ip, PROTO_ICMP, message)
        link.count("udp.icmp_errors")

    def _host_error6(self, flow: UdpFlow, dst: tuple[str, int], icmp_type: int,
                     icmp_code: int, mtu: int, now: float) -> None:
        """:meth:`host_error` for an IPv6 flow: the ICMPv6 error (RFC 4443) to the guest."""
        link = self.link
        if icmp_type == icmpv6.PACKET_TOO_BIG:
            # Only news the guest can act on: its packets to us are at most the link MTU.
            if not ipv6.MIN_MTU <= mtu < link.mtu:
                link.count("drop.udp.host_error_ignored")
                return
            head = _U32.pack(mtu)
        elif icmp_type in (icmpv6.DEST_UNREACH, icmpv6.TIME_EXCEEDED):
            if not self._icmp_errors.take(now):
                link.count("drop.udp.icmp_rate")
                return
            head = bytes(4)
        else:
            link.count("drop.udp.host_error_ignored")
            return
        origin = self._origin(flow, dst[0], dst[1])
        if origin is None:
            link.count("drop.udp.loopback_source")
            return
        quote = bytearray(_IP6_UDP_LEN)
        ipv6.build_header(quote, 0, flow.guest_ip, origin[0], PROTO_UDP, wire_udp.HEADER_LEN)
        _UDP_HEADER.pack_into(quote, ipv6.HEADER_LEN, flow.guest_port, origin[1],
                              wire_udp.HEADER_LEN, 0)
        by_destination = (icmp_type == icmpv6.DEST_UNREACH
                          and icmp_code == icmpv6.PORT_UNREACH)
        sender = origin[0] if by_destination else self._gateway6
        message = icmpv6.build(icmp_type, icmp_code, head + quote, sender, flow.guest_ip)
        link.send_ipv6(sender, flow.guest_ip, ipv6.PROTO_ICMPV6, message)
        link.count("udp.icmp_errors")

    # ---- port forwarding -----------------------------------------------------------
    def add_forward(self, guest_ip: bytes, guest_port: int, host_handle: object,
                    now: float) -> UdpFlow:
        """A permanent flow for ``guest_ip:guest_port`` over the runtime's bound socket.

        For a host port forwarded into the guest: the runtime passes what that
        socket receives to :meth:`host_datagram` (a loopback peer appears as
        the gateway, even with host loopback disabled), and whatever the guest
        sends from ``guest_port`` leaves through ``host_handle`` (``udp_send``),
        so replies come from the forwarded host port. An ordinary flow of the
        same guest port is closed first. Undone by :meth:`remove_forward`.
        """
        key = (guest_ip, guest_port)
        old = self.flows.get(key)
        if old is not None:
            if old.forward:
                raise ValueError(f"{old!r} is already forwarded")
            self._close(old)
        flow = UdpFlow(self, guest_ip, guest_port, now)
        flow.forward = True
        flow.dns_only = False
        flow.host_handle = host_handle
        self.flows[key] = flow
        self.link.count("udp.forwards_added")
        return flow

    def remove_forward(self, flow: UdpFlow) -> None:
        """End a forward: ``host.udp_close(flow)`` releases the runtime's socket."""
        if not flow.closed:
            self._close(flow)

    # ---- lifetime ----------------------------------------------------------------
    def _mark_replied(self, flow: UdpFlow) -> None:
        """The host side answered: the flow is kept (long timeout, never evicted)."""
        flow.replied = True
        if self._unreplied.get(flow.key) is flow:
            del self._unreplied[flow.key]

    def _evict_oldest_unreplied(self) -> None:
        """Make room in a full table: close the oldest flow never answered."""
        flow = next(iter(self._unreplied.values()))
        self._close(flow)
        self.link.count("udp.flows_evicted")

    def _check_expiry(self, flow: UdpFlow, now: float) -> None:
        if flow.closed or flow.forward:
            return
        deadline = flow.last_active + flow.idle_timeout()
        if now < deadline:
            self.timers.schedule(flow, deadline)
            return
        self._close(flow)
        self.link.count("udp.flows_expired")

    def _close(self, flow: UdpFlow) -> None:
        flow.closed = True
        self.timers.cancel(flow)
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if self._unreplied.get(flow.key) is flow:
            del self._unreplied[flow.key]
        self.host.udp_close(flow)

    def close_all(self) -> None:
        """Close every flow's host socket (shutdown). Nothing is sent to the guest."""
        for flow in list(self.flows.values()):
            self._close(flow)
