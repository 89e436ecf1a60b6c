"""IPv6 on the guest link: Neighbor Discovery, router advertisements, ICMPv6 echo.

Theory of operation
-------------------
With ``config.enable_ipv6`` we are the guest's IPv6 router on a /64
(``config.network6``, fd00::/64 by default) with the addresses slirp4netns
uses: the gateway ``network6 + 2`` and the DNS server ``network6 + 3``, plus
one link-local address, libslirp's ``fe80::2``
(``config.link_local6``), which sends every router advertisement and so
becomes the guest's default router. :data:`NdpEngine.our_addrs` are those
three; all answer on our MAC.

Neighbor Discovery (RFC 4861), as section 7.1.1 and 6.1.1 validate it: a
Neighbor or Router Solicitation counts only with hop limit 255 (proof it
was not forwarded), code 0, its minimum length, and well-formed options (a
zero-length option or one running past the message makes the stack count the
frame malformed: ``drop.malformed.icmpv6``); a failed check is counted
(``ndp.drop.<reason>``) and dropped.

* A Neighbor Solicitation for one of ``our_addrs`` gets a solicited Neighbor
  Advertisement (Router, Solicited and Override flags, our MAC as target
  link-layer address) sent to the soliciting address and MAC. A solicitation
  from the unspecified address is a guest's Duplicate Address Detection probe
  (RFC 4862 5.4): it is never answered (``ndp.dad_probe``), so no address the
  guest tries is reported as a conflict, as libslirp does; a solicitation for
  anything else is ignored too (``ndp.ns_not_ours``): nobody else is on the
  link.
* A Router Solicitation gets a Router Advertisement at once, or, within
  :data:`MIN_DELAY_BETWEEN_RAS` of the last one, when that delay is over
  (RFC 4861 6.2.6), so a guest flooding solicitations gets one RA per 3 s.
  A solicited advertisement restarts the unsolicited schedule.
* Unsolicited advertisements start when the guest is first seen speaking IPv6
  (the stack calls :meth:`NdpEngine.guest_seen` for each IPv6 packet):
  the first one then, :data:`MAX_INITIAL_RTR_ADVERTISEMENTS` - 1 more every
  :data:`MAX_INITIAL_RTR_ADVERT_INTERVAL` s, then one every
  :data:`RA_INTERVAL` s. The interval is fixed rather than random (RFC 4861
  6.2.4 randomises to keep several routers on a segment apart; we are the only
  one). Time comes from the shared :class:`~pyslirp.stack.timers.Timers`.

Each advertisement goes to all-nodes (ff02::1) from our link-local address
with: the "other configuration" flag (DNS by stateless DHCPv6, see
:mod:`pyslirp.stack.dhcpv6`), router lifetime :data:`ROUTER_LIFETIME`, our
MAC (source link-layer address), the link MTU, the prefix (on-link and
autonomous, so the guest forms its SLAAC address in it), and unless
``config.disable_dns`` our DNS address (RDNSS, RFC 8106) and the search
domains (DNSSL), if any fit the link MTU.

The guest's addresses are learned from the source of its packets:
``guest_addr6`` the last one inside the prefix, ``guest_link_local6`` the last
link-local one (a DAD probe's tentative target is never learned as either;
``guest_dad6`` keeps the last one in the prefix, which port forwarding takes
for the guest's address until it has sent from one: a server that only
listens never does).

ICMPv6 echo requests to ``our_addrs`` are answered with an echo reply carrying
the same identifier, sequence number and data (RFC 4443 4.2), in fragments if
it is larger than the link MTU; echo requests to a group we listen to are
dropped (``icmpv6.echo_not_ours``). Echo to unicast addresses not ours never
comes here: the stack gives it to the ICMP engine, which relays it
(:mod:`pyslirp.stack.icmp`). Every other ICMPv6 type (MLD reports, advertisements from the
guest, errors) is counted ``icmpv6.ignored.<type>`` and dropped.
"""

from __future__ import annotations

import math

from pyslirp.stack.config import NetConfig, search_domain_problem
from pyslirp.stack.frag import send_fragmented6
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import ethernet, icmpv6, ipv6
from pyslirp.wire.dhcp import domain_labels
from pyslirp.wire.dhcpv6 import encode_domain_list
from pyslirp.wire.ipv6 import Ipv6Packet

#: RFC 4861 6.2.1/10 defaults, except the fixed (not random) interval.
RA_INTERVAL = 200.0
MAX_INITIAL_RTR_ADVERTISEMENTS = 3
MAX_INITIAL_RTR_ADVERT_INTERVAL = 16.0
MIN_DELAY_BETWEEN_RAS = 3.0
#: 3 x MaxRtrAdvInterval (600 s), RFC 4861 6.2.1; also the RDNSS/DNSSL lifetime.
ROUTER_LIFETIME = 1800
PREFIX_VALID_LIFETIME = 86400
PREFIX_PREFERRED_LIFETIME = 14400
ND_HOP_LIMIT = 255
HOP_LIMIT = 64


def send_ipv6(link: Link, dst_mac: bytes, src: bytes, dst: bytes, proto: int,
              payload: bytes | bytearray, hop_limit: int = HOP_LIMIT) -> None:
    """Send one IPv6 packet to the guest (the link drops it if over the MTU)."""
    head = ipv6.header(src, dst, proto, len(payload), hop_limit)
    link.send_ethernet(dst_mac, ethernet.ETHERTYPE_IPV6, head + payload)


class NdpEngine:
    """Neighbor Discovery and router advertisements for the guest; ICMPv6 echo to us."""

    def __init__(self, config: NetConfig, link: Link, timers: Timers) -> None:
        self.config = config
        self.link = link
        self.timers = timers
        self.link_local = config.link_local6
        #: Our unicast addresses: the gateway, the DNS server, our link-local address.
        self.our_addrs = frozenset((config.gateway6, config.dns6, self.link_local))
        self._prefix = config.network6.network_address.packed
        self._prefix_int = int(config.network6.network_address) >> 64
        #: The guest's addresses, from the sources of its packets (None: not seen yet).
        self.guest_addr6: bytes | None = None
        self.guest_link_local6: bytes | None = None
        #: The last address in the prefix the guest probed for (DAD): its own once the
        #: probe is over, though it may not have sent from it yet (port forwarding).
        self.guest_dad6: bytes | None = None
        self.timer_deadline: float | None = None
        self._started = False
        self._last_ra = -math.inf
        self._initial_left = MAX_INITIAL_RTR_ADVERTISEMENTS

    # ---- from the stack ---------------------------------------------------------------
    def guest_seen(self, ip: Ipv6Packet, now: float) -> None:
        """Every IPv6 packet from the guest: learn its address, start advertising."""
        src = ip.src
        if int.from_bytes(src[:8], "big") == self._prefix_int:
            self.guest_addr6 = src
        elif ipv6.is_link_local(src):
            self.guest_link_local6 = src
        elif src == ipv6.UNSPECIFIED:
            self._dad_probe(ip)
        if not self._started:
            self._started = True
            self.timers.schedule(self, now)

    def _dad_probe(self, ip: Ipv6Packet) -> None:
        """Remember the target of a Duplicate Address Detection probe in the prefix (it
        goes to a solicited-node group we do not join, so it is not handled further)."""
        body = ip.payload
        if ip.proto == ipv6.PROTO_ICMPV6 and len(body) >= icmpv6.NS_FIXED_LEN \
                and body[0] == icmpv6.NEIGHBOR_SOLICIT and body[1] == 0:
            target = bytes(body[8:24])
            if int.from_bytes(target[:8], "big") == self._prefix_int:
                self.guest_dad6 = target

    def handle(self, ip: Ipv6Packet, src_mac: bytes, now: float, trusted: bool = False) -> None:
        """An ICMPv6 message addressed to us (unicast or a group we listen to); ``trusted``:
        the vnet header vouched for its checksum."""
        msg = icmpv6.Icmpv6Message(ip.payload, ip.src, ip.dst, verify_checksum=not trusted)
        kind = msg.type
        if kind == icmpv6.ECHO_REQUEST:
            self._echo(ip, msg)
        elif kind == icmpv6.NEIGHBOR_SOLICIT:
            self._neighbor_solicit(ip, msg, src_mac)
        elif kind == icmpv6.ROUTER_SOLICIT:
            self._router_solicit(ip, msg, now)
        else:
            self.link.count(f"icmpv6.ignored.{kind}")

    # ---- echo ---------------------------------------------------------------------------
    def _echo(self, ip: Ipv6Packet, msg: icmpv6.Icmpv6Message) -> None:
        if ip.dst not in self.our_addrs or msg.code != 0:
            self.link.count("icmpv6.echo_not_ours")
            return
        if ip.src == ipv6.UNSPECIFIED or ipv6.is_multicast(ip.src):
            self.link.count("icmpv6.drop.bad_source")
            return
        reply = icmpv6.build(icmpv6.ECHO_REPLY, 0, msg.payload, ip.dst, ip.src)
        # A big ping came reassembled (pyslirp.stack.frag); its reply goes in fragments.
        send_fragmented6(self.link, ip.dst, ip.src, ipv6.PROTO_ICMPV6, reply)
        self.link.count("icmpv6.echo_reply")

    # ---- neighbor discovery -----------------------------------------------------------
    def _nd_valid(self, ip: Ipv6Packet, msg: icmpv6.Icmpv6Message, fixed_len: int) -> bool:
        """RFC 4861 7.1.1 / 6.1.1 checks shared by NS and RS (options are parsed later)."""
        if ip.hop_limit != ND_HOP_LIMIT:
            self.link.count("ndp.drop.hop_limit")
            return False
        if msg.code != 0 or len(msg.buf) < fixed_len:
            self.link.count("ndp.drop.bad_message")
            return False
        return True

    def _neighbor_solicit(self, ip: Ipv6Packet, msg: icmpv6.Icmpv6Message,
                          src_mac: bytes) -> None:
        if not self._nd_valid(ip, msg, icmpv6.NS_FIXED_LEN):
            return
        target = bytes(msg.buf[8:24])
        options = icmpv6.parse_nd_options(msg.buf[icmpv6.NS_FIXED_LEN:])
        if ipv6.is_multicast(target):
            self.link.count("ndp.drop.bad_message")
            return
        if ip.src == ipv6.UNSPECIFIED:
            if any(kind == icmpv6.OPT_SOURCE_LLADDR for kind, _ in options):
                self.link.count("ndp.drop.bad_message")  # RFC 4861 7.1.1
            else:
                self.link.count("ndp.dad_probe")
            return
        if target not in self.our_addrs:
            self.link.count("ndp.ns_not_ours")
            return
        body = (bytes((icmpv6.NA_ROUTER | icmpv6.NA_SOLICITED | icmpv6.NA_OVERRIDE,))
                + bytes(3) + target
                + icmpv6.lladdr_option(icmpv6.OPT_TARGET_LLADDR, self.link.our_mac))
        advert = icmpv6.build(icmpv6.NEIGHBOR_ADVERT, 0, body, target, ip.src)
        send_ipv6(self.link, src_mac, target, ip.src, ipv6.PROTO_ICMPV6, advert,
                  hop_limit=ND_HOP_LIMIT)
        self.link.count("ndp.neighbor_advert")

    def _router_solicit(self, ip: Ipv6Packet, msg: icmpv6.Icmpv6Message, now: float) -> None:
        if not self._nd_valid(ip, msg, icmpv6.RS_FIXED_LEN):
            return
        options = icmpv6.parse_nd_options(msg.buf[icmpv6.RS_FIXED_LEN:])
        if ip.src == ipv6.UNSPECIFIED and any(
                kind == icmpv6.OPT_SOURCE_LLADDR for kind, _ in options):
            self.link.count("ndp.drop.bad_message")  # RFC 4861 6.1.1
            return
        due = self._last_ra + MIN_DELAY_BETWEEN_RAS
        if now >= due:
            self.send_router_advert(now)
            self._schedule_next(now)
        elif self.timer_deadline is None or self.timer_deadline > due:
            self.timers.schedule(self, due)
            self.link.count("ndp.ra_deferred")

    # ---- router advertisements ------------------------------------------------------
    def on_timer(self, now: float) -> None:
        self.send_router_advert(now)
        self._schedule_next(now)

    def _schedule_next(self, now: float) -> None:
        if self._initial_left > 0:
            self.timers.schedule(self, now + MAX_INITIAL_RTR_ADVERT_INTERVAL)
        else:
            self.timers.schedule(self, now + RA_INTERVAL)

    def send_router_advert(self, now: float) -> None:
        """Multicast one Router Advertisement to all nodes (see the module doc)."""
        self._last_ra = now
        if self._initial_left > 0:
            self._initial_left -= 1
        body = icmpv6.ra_body(HOP_LIMIT, icmpv6.RA_FLAG_OTHER, ROUTER_LIFETIME,
                              self._ra_options())
        advert = icmpv6.build(icmpv6.ROUTER_ADVERT, 0, body, self.link_local, ipv6.ALL_NODES)
        send_ipv6(self.link, ipv6.multicast_mac(ipv6.ALL_NODES), self.link_local,
                  ipv6.ALL_NODES, ipv6.PROTO_ICMPV6, advert, hop_limit=ND_HOP_LIMIT)
        self.link.count("ndp.router_advert")

    def _ra_options(self) -> bytes:
        cfg = self.config
        options = (icmpv6.lladdr_option(icmpv6.OPT_SOURCE_LLADDR, self.link.our_mac)
                   + icmpv6.mtu_option(cfg.mtu)
                   + icmpv6.prefix_option(self._prefix, cfg.network6.prefixlen,
                                          icmpv6.PREFIX_ON_LINK | icmpv6.PREFIX_AUTONOMOUS,
                                          PREFIX_VALID_LIFETIME, PREFIX_PREFERRED_LIFETIME))
        if cfg.disable_dns:
            return options
        options += icmpv6.rdnss_option(ROUTER_LIFETIME, [cfg.dns6])
        names = search_list(cfg.search_domains)
        if names:
            dnssl = icmpv6.dnssl_option(ROUTER_LIFETIME, names)
            # ICMPv6 header (4) + RA fixed part (12) + options must fit the link's MTU.
            if ipv6.HEADER_LEN + 16 + len(options) + len(dnssl) <= cfg.mtu:
                options += dnssl
            else:
                self.link.count("ndp.dnssl_too_big")
        return options


def search_list(domains: list[str]) -> bytes:
    """The search domains that can be served, in DNS wire form (RFC 8106 DNSSL, RFC 3646)."""
    good = []
    for domain in domains:
        if search_domain_problem(domain) is None:
            try:
                good.append(domain_labels(domain))
            except ValueError:  # pragma: no cover - search_domain_problem checked it
                continue
    return encode_domain_list(good)

