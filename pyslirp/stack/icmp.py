"""ICMP: echo answered by the virtual router, or relayed through host ping sockets.

Theory of operation
-------------------
Only echo requests (RFC 792, type 8) from the guest are acted on:

* To the gateway or the DNS address: answered here with an echo reply with
  the same identifier, sequence number and data (RFC 1122 section 3.2.2.6),
  as libslirp's ``icmp_reflect`` does. This holds with
  ``disable_host_loopback`` too: the gateway is the virtual router, which
  exists whatever the host's loopback policy; answering reaches no host
  service and tells the guest nothing about the host, and ``ping 10.0.2.2``
  is the first thing anyone tries when debugging a link.
* To any other unicast address the stack's policy allows: relayed with
  ``host.icmp_echo``, which the runtime implements with an unprivileged ICMP
  datagram socket (``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``). Such a
  socket rewrites the identifier to its own, so a *flow* is keyed by (guest
  address, identifier, destination) and the reply (``host_echo_reply``)
  gets the guest's identifier back. Flows expire after ``IDLE_TIMEOUT``
  (60 s) without traffic, and at most ``max_flows`` exist (a socket each).
* When the policy refuses the destination, or the host refuses to ping
  (``icmp_echo`` returns False: ``net.ipv4.ping_group_range`` excludes us),
  the guest gets destination unreachable with code 13, "communication
  administratively prohibited" (RFC 1812 section 5.2.7.1). That is the truth
  in both cases, a local rule and not a routing fact, and tools say so
  (ping prints "Packet filtered"), where host unreachable (code 1) would
  send the user debugging routes that are fine.

Errors the host's ping socket reports (``host_echo_error``) become ICMP
errors to the guest quoting a reconstructed echo request.

Everything else from the guest (echo replies, errors, timestamps, router
solicitations...) is counted and dropped: errors about our own packets carry
nothing we could act on, and RFC 1122 section 3.2.2 lets a host ignore the
informational types. Echo to broadcast or multicast addresses is dropped
too (Linux's default, icmp_echo_ignore_broadcasts), and no error is ever
sent about an ICMP error (RFC 1122 section 3.2.2).

Not done: ICMP for IPv6, forwarding of other ICMP types, rate limiting of
our own errors (they are one per refused echo request, never more).
"""

from __future__ import annotations

import struct

from pyslirp.stack.config import NetConfig
from pyslirp.stack.frag import send_fragmented
from pyslirp.stack.host import Buffer, HostPort, Policy
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp as wire_icmp
from pyslirp.wire import ipv4
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv4 import PROTO_ICMP, Ipv4Packet

IDLE_TIMEOUT = 60.0
DEFAULT_MAX_FLOWS = 256
#: TTL of the echo replies we answer ourselves (gateway, DNS): 255, as libslirp's.
LOCAL_REPLY_TTL = 255
#: RFC 1812 section 5.2.7.1: communication administratively prohibited.
ADMIN_PROHIBITED = 13
#: The largest ICMP data one IPv4 packet can carry (65535 - 20 - 8).
MAX_PAYLOAD = 65507

_ECHO_HEADER = struct.Struct("!BBHHH")

_Key = tuple[bytes, int, bytes]


class IcmpFlow:
    """An echo "session" (guest address, identifier, destination) on one host ping socket.

    ``host_handle`` is the runtime's to use (e.g. its socket object).
    """

    __slots__ = ("engine", "guest_ip", "ident", "dst", "target", "last_active", "closed",
                 "timer_deadline", "host_handle")

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

    @property
    def key(self) -> _Key:
        return (self.guest_ip, self.ident, self.dst)

    def on_timer(self, now: float) -> None:
        self.engine._check_expiry(self, now)

    def __repr__(self) -> str:
        return (f"<IcmpFlow {ipv4.addr_to_str(self.guest_ip)} id={self.ident} "
                f"-> {ipv4.addr_to_str(self.dst)}>")


class IcmpEngine:
    """ICMP for one guest link. Sans-I/O: see :mod:`pyslirp.stack`."""

    __slots__ = ("config", "link", "host", "timers", "policy", "flows", "max_flows",
                 "_gateway", "_dns", "_broadcast")

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
        key = (src, msg.ident, dst)
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
            flow = IcmpFlow(self, src, msg.ident, dst, targets[0][0], now)
        flow.last_active = now
        if not self.host.icmp_echo(flow, flow.target, msg.ident, msg.seq, msg.payload):
            link.count("drop.icmp.host_refused")
            self._prohibited(ip)
            if new:
                # Not kept; the runtime may have made a socket before the send failed.
                self.host.icmp_close(flow)
            return
        if new:
            self.flows[key] = flow
            self.timers.schedule(flow, now + IDLE_TIMEOUT)

    def _prohibited(self, ip: Ipv4Packet) -> None:
        message = wire_icmp.build_error(wire_icmp.DEST_UNREACH, ADMIN_PROHIBITED, ip.buf)
        self.link.send_ipv4(self._gateway, ip.src, PROTO_ICMP, message)

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
        reply = wire_icmp.build_echo(wire_icmp.ECHO_REPLY, flow.ident, seq & 0xFFFF, payload)
        send_fragmented(link, flow.dst, flow.guest_ip, PROTO_ICMP, reply)

    def host_echo_error(self, flow: IcmpFlow, seq: int, icmp_type: int, icmp_code: int,
                        now: float) -> None:
        """The host's ping socket got an ICMP error (IP_RECVERR) for request ``seq``."""
        link = self.link
        if flow.closed:
            link.count("drop.icmp.closed_flow")
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
