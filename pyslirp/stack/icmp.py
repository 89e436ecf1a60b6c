"""ICMP and ICMPv6 echo: answered by the virtual router, or relayed through host ping sockets.

Theory of operation
-------------------
Only echo requests (RFC 792, type 8; RFC 4443, type 128) from the guest are
acted on. IPv4 and IPv6 share this engine and its flow table; the family is
data (a flow's 16-byte addresses, ``flow.v6``), as in the TCP and UDP
engines:

* To the gateway or the DNS address: answered here with an echo reply with
  the same identifier, sequence number and data (RFC 1122 section 3.2.2.6),
  as libslirp's ``icmp_reflect`` does (over IPv6 the NDP engine answers for
  our addresses, :mod:`pyslirp.stack.ndp`; the stack passes this engine
  only ICMPv6 to unicast addresses not ours). This holds with
  ``disable_host_loopback`` too: the gateway is the virtual router, which
  exists whatever the host's loopback policy; answering reaches no host
  service and tells the guest nothing about the host, and ``ping 10.0.2.2``
  is the first thing anyone tries when debugging a link.
* To any other unicast address the stack's policy allows: relayed with
  ``host.icmp_echo``, which the runtime implements with an unprivileged ICMP
  datagram socket (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, or
  ``AF_INET6``/``IPPROTO_ICMPV6``: ``net.ipv4.ping_group_range`` governs
  both). Such a socket rewrites the identifier to its own, so a *flow* is keyed by (guest
  address, identifier, destination) and the reply (``host_echo_reply``)
  gets the guest's identifier back. Flows expire after ``IDLE_TIMEOUT``
  (60 s) without traffic, and at most ``max_flows`` exist (a socket each).
* When the policy refuses the destination, or the host refuses to ping
  (``icmp_echo`` returns False: ``net.ipv4.ping_group_range`` excludes us),
  the guest gets destination unreachable with code 13, "communication
  administratively prohibited" (RFC 1812 section 5.2.7.1). That is the truth
  in both cases, a local rule and not a routing fact, and tools say so
  (ping prints "Packet filtered"), where host unreachable (code 1) would
  send the user debugging routes that are fine. Over IPv6 it is ICMPv6
  destination unreachable code 1, the same words (RFC 4443 3.1).

Errors the host's ping socket reports (``host_echo_error``) become ICMP
errors to the guest quoting a reconstructed echo request: destination
unreachable and time exceeded, and over IPv6 packet too big too when its MTU
is below the link's (a big ping the guest fragmented to us, whose path from
the host is smaller still). Replies larger than the link MTU go to the guest
as fragments of either family.

Everything else from the guest (echo replies, errors, timestamps, router
solicitations...) is counted and dropped: errors about our own packets carry
nothing we could act on, and RFC 1122 section 3.2.2 lets a host ignore the
informational types. Echo to broadcast or multicast addresses is dropped
too (Linux's default, icmp_echo_ignore_broadcasts), and no error is ever
sent about an ICMP error (RFC 1122 section 3.2.2).

Not done: forwarding of other ICMP types, rate limiting of our own errors
(they are one per refused echo request, never more).
"""

from __future__ import annotations

import struct

from pyslirp.stack.config import NetConfig
from pyslirp.stack.frag import send_fragmented, send_fragmented6
from pyslirp.stack.host import Buffer, HostPort, Policy
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp as wire_icmp
from pyslirp.wire import icmpv6, ipv4, ipv6
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv4 import PROTO_ICMP, Ipv4Packet
from pyslirp.wire.ipv6 import PROTO_ICMPV6, Ipv6Packet

IDLE_TIMEOUT = 60.0
DEFAULT_MAX_FLOWS = 256
#: TTL of the echo replies we answer ourselves (gateway, DNS): 255, as libslirp's.
LOCAL_REPLY_TTL = 255
#: RFC 1812 section 5.2.7.1: communication administratively prohibited.
ADMIN_PROHIBITED = 13
#: The largest ICMP data one IPv4 packet can carry (65535 - 20 - 8).
MAX_PAYLOAD = 65507

_ECHO_HEADER = struct.Struct("!BBHHH")
#: RFC 4443 2.4 (c): an ICMPv6 error carries as much of the packet as fits 1280 bytes.
_QUOTE6_ROOM = ipv6.MIN_MTU - ipv6.HEADER_LEN - icmpv6.HEADER_LEN

_Key = tuple[bytes, int, bytes]


class IcmpFlow:
    """An echo "session" (guest address, identifier, destination) on one host ping socket.

    ``host_handle`` is the runtime's to use (e.g. its socket object).
    """

    __slots__ = ("engine", "guest_ip", "ident", "dst", "target", "last_active", "closed",
                 "timer_deadline", "host_handle", "v6")

    def __init__(self, engine: IcmpEngine, guest_ip: bytes, ident: int, dst: bytes,
                 target: str, now: float) -> None:
        self.engine = engine
        self.guest_ip = guest_ip
        self.ident = ident
        #: The destination as the guest addressed it.
        self.dst = dst
        #: The host address the runtime pings.
        self.target = target
        self.last_active = now
        self.closed = False
        self.timer_deadline: float | None = None
        self.host_handle: object = None
        #: ICMPv6 echo (16-byte addresses): the runtime pings with an ICMPv6 socket.
        self.v6 = len(guest_ip) == 16

    @property
    def key(self) -> _Key:
        return (self.guest_ip, self.ident, self.dst)

    def on_timer(self, now: float) -> None:
        self.engine._check_expiry(self, now)

    def __repr__(self) -> str:
        text = ipv6.addr_to_str if self.v6 else ipv4.addr_to_str
        return f"<IcmpFlow {text(self.guest_ip)} id={self.ident} -> {text(self.dst)}>"


class IcmpEngine:
    """ICMP for one guest link. Sans-I/O: see :mod:`pyslirp.stack`."""

    __slots__ = ("config", "link", "host", "timers", "policy", "flows", "max_flows",
                 "_gateway", "_dns", "_broadcast", "_gateway6")

    def __init__(self, config: NetConfig, link: Link, host: HostPort, timers: Timers,
                 policy: Policy, *, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.config = config
        self.link = link
        self.host = host
        self.timers = timers
        self.policy = policy
        self.flows: dict[_Key, IcmpFlow] = {}
        self.max_flows = max_flows
        self._gateway = config.gateway
        self._dns = config.dns
        self._broadcast = config.broadcast
        self._gateway6 = config.gateway6

    def __len__(self) -> int:
        return len(self.flows)

    # ---- guest -> us / host ------------------------------------------------------
    def handle(self, ip: Ipv4Packet, now: float, checksum_verified: bool) -> None:
        """An ICMP packet from the guest (whole, not a fragment)."""
        link = self.link
        if ip.is_fragment:
            link.count("drop.icmp.fragment")
            return
        try:
            msg = wire_icmp.IcmpMessage(ip.payload, verify_checksum=not checksum_verified)
        except MalformedPacket:
            link.count("drop.malformed.icmp")
            return
        if msg.type != wire_icmp.ECHO_REQUEST:
            link.count("drop.icmp.type")
            return
        src, dst = ip.src, ip.dst
        if dst[0] >= 224 or dst == self._broadcast or src[0] == 0 or src[0] >= 224:
            link.count("drop.icmp.broadcast")
            return
        if dst == self._gateway or dst == self._dns:
            reply = wire_icmp.build_echo(wire_icmp.ECHO_REPLY, msg.ident, msg.seq, msg.payload)
            # TTL 255, as libslirp's replies: `ping 10.0.2.2` shows ttl=255 with slirp4netns.
            send_fragmented(link, dst, src, PROTO_ICMP, reply, ttl=LOCAL_REPLY_TTL)
            return
        self._relay(ip, msg.ident, msg.seq, msg.payload, now)

    def handle6(self, ip: Ipv6Packet, now: float, checksum_verified: bool) -> None:
        """An ICMPv6 message from the guest to a unicast address that is not ours
        (whole: the stack reassembled any fragments)."""
        link = self.link
        msg = icmpv6.Icmpv6Message(ip.payload, ip.src, ip.dst,
                                   verify_checksum=not checksum_verified)
        if msg.type != icmpv6.ECHO_REQUEST or msg.code != 0:
            link.count("drop.icmp.type")
            return
        src = ip.src
        if src == ipv6.UNSPECIFIED or ipv6.is_multicast(src) or ipv6.is_multicast(ip.dst):
            link.count("drop.icmp.broadcast")
            return
        self._relay(ip, msg.ident, msg.seq, msg.buf[icmpv6.HEADER_LEN:], now)

    def _relay(self, ip: Ipv4Packet | Ipv6Packet, ident: int, seq: int, data: Buffer,
               now: float) -> None:
        """Send the guest's echo request on through its flow's host ping socket."""
        link = self.link
        src, dst = ip.src, ip.dst
        key = (src, ident, dst)
        flow = self.flows.get(key)
        new = flow is None
        if flow is None:
            targets = self.policy(dst, 0)
            if not targets:
                link.count("drop.icmp.policy")
                self._prohibited(ip)
                return
            if len(self.flows) >= self.max_flows:
                link.count("drop.icmp.flow_limit")
                return
            flow = IcmpFlow(self, src, ident, dst, targets[0][0], now)
        flow.last_active = now
        if not self.host.icmp_echo(flow, flow.target, ident, seq, data):
            link.count("drop.icmp.host_refused")
            self._prohibited(ip)
            if new:
                # Not kept; the runtime may have made a socket before the send failed.
                self.host.icmp_close(flow)
            return
        if new:
            self.flows[key] = flow
            self.timers.schedule(flow, now + IDLE_TIMEOUT)

    def _prohibited(self, ip: Ipv4Packet | Ipv6Packet) -> None:
        if isinstance(ip, Ipv6Packet):
            self._send_error6(ip.src, icmpv6.DEST_UNREACH, icmpv6.ADMIN_PROHIBITED, 0,
                              ip.buf[:_QUOTE6_ROOM])
            return
        message = wire_icmp.build_error(wire_icmp.DEST_UNREACH, ADMIN_PROHIBITED, ip.buf)
        self.link.send_ipv4(self._gateway, ip.src, PROTO_ICMP, message)

    def _send_error6(self, guest: bytes, icmp_type: int, code: int, word: int,
                     quote: Buffer) -> None:
        """An ICMPv6 error from the gateway; ``word`` is its second 32 bits (the MTU)."""
        body = word.to_bytes(4, "big") + bytes(quote)
        message = icmpv6.build(icmp_type, code, body, self._gateway6, guest)
        self.link.send_ipv6(self._gateway6, guest, PROTO_ICMPV6, message)

    # ---- host -> guest -----------------------------------------------------------
    def host_echo_reply(self, flow: IcmpFlow, seq: int, payload: Buffer, now: float) -> None:
        """The host's ping socket got the echo reply with sequence ``seq``."""
        link = self.link
        if flow.closed:
            link.count("drop.icmp.closed_flow")
            return
        if len(payload) > MAX_PAYLOAD:
            link.count("drop.icmp.oversize")
            return
        flow.last_active = now
        if flow.v6:
            body = _ECHO_HEADER.pack(0, 0, 0, flow.ident, seq & 0xFFFF)[4:] + bytes(payload)
            reply6 = icmpv6.build(icmpv6.ECHO_REPLY, 0, body, flow.dst, flow.guest_ip)
            send_fragmented6(link, flow.dst, flow.guest_ip, PROTO_ICMPV6, reply6)
            return
        reply = wire_icmp.build_echo(wire_icmp.ECHO_REPLY, flow.ident, seq & 0xFFFF, payload)
        send_fragmented(link, flow.dst, flow.guest_ip, PROTO_ICMP, reply)

    def host_echo_error(self, flow: IcmpFlow, seq: int, icmp_type: int, icmp_code: int,
                        now: float, info: int = 0) -> None:
        """The host's ping socket got an ICMP error (IP_RECVERR) for request ``seq``; for
        an ICMPv6 flow an ICMPv6 one (IPV6_RECVERR), ``info`` the MTU of a packet too big."""
        link = self.link
        if flow.closed:
            link.count("drop.icmp.closed_flow")
            return
        if flow.v6:
            self._host_echo_error6(flow, seq, icmp_type, icmp_code, info, now)
            return
        if icmp_type not in (wire_icmp.DEST_UNREACH, wire_icmp.TIME_EXCEEDED):
            link.count("drop.icmp.host_error_ignored")
            return
        flow.last_active = now
        quote = bytearray(ipv4.MIN_HEADER_LEN + wire_icmp.HEADER_LEN)
        ipv4.build_header(quote, 0, flow.guest_ip, flow.dst, PROTO_ICMP,
                          wire_icmp.HEADER_LEN, flags=0)
        # The echo request's header as the guest sent it (its checksum is not needed).
        _ECHO_HEADER.pack_into(quote, ipv4.MIN_HEADER_LEN, wire_icmp.ECHO_REQUEST, 0, 0,
                               flow.ident, seq & 0xFFFF)
        message = wire_icmp.build_error(icmp_type, icmp_code, quote)
        link.send_ipv4(self._gateway, flow.guest_ip, PROTO_ICMP, message)

    def _host_echo_error6(self, flow: IcmpFlow, seq: int, icmp_type: int, icmp_code: int,
                          mtu: int, now: float) -> None:
        if icmp_type == icmpv6.PACKET_TOO_BIG:
            if not ipv6.MIN_MTU <= mtu < self.link.mtu:
                self.link.count("drop.icmp.host_error_ignored")
                return
        elif icmp_type not in (icmpv6.DEST_UNREACH, icmpv6.TIME_EXCEEDED):
            self.link.count("drop.icmp.host_error_ignored")
            return
        else:
            mtu = 0
        flow.last_active = now
        quote = bytearray(ipv6.HEADER_LEN + icmpv6.HEADER_LEN)
        ipv6.build_header(quote, 0, flow.guest_ip, flow.dst, PROTO_ICMPV6, icmpv6.HEADER_LEN)
        _ECHO_HEADER.pack_into(quote, ipv6.HEADER_LEN, icmpv6.ECHO_REQUEST, 0, 0,
                               flow.ident, seq & 0xFFFF)
        self._send_error6(flow.guest_ip, icmp_type, icmp_code, mtu, quote)

    # ---- lifetime ----------------------------------------------------------------
    def _check_expiry(self, flow: IcmpFlow, now: float) -> None:
        if flow.closed:
            return
        deadline = flow.last_active + IDLE_TIMEOUT
        if now < deadline:
            self.timers.schedule(flow, deadline)
            return
        self._close(flow)
        self.link.count("icmp.flows_expired")

    def _close(self, flow: IcmpFlow) -> None:
        flow.closed = True
        self.timers.cancel(flow)
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        self.host.icmp_close(flow)

    def close_all(self) -> None:
        """Close every flow's host socket (shutdown). Nothing is sent to the guest."""
        for flow in list(self.flows.values()):
            self._close(flow)
