"""IPv6 on the guest link: neighbor and router discovery, ICMPv6 echo, stateless DHCPv6,
and hostile IPv6 input (dropped and counted, never a crash, never an answer)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from pyslirp.stack import ndp
from pyslirp.stack.config import NetConfig
from pyslirp.stack.dhcpv6 import build_udp6
from pyslirp.stack.stack import Stack
from pyslirp.wire import dhcpv6, ethernet, icmpv6, ipv6
from pyslirp.wire.checksum import partial_sum
from tests.stack.fakes import CaptureSink, FakeClock, FakeHost

GUEST_MAC = bytes.fromhex("0200000000aa")
GUEST_LL = ipv6.link_local(GUEST_MAC)
GUEST_GLOBAL = ipv6.addr_from_str("fd00::aa")
GATEWAY = ipv6.addr_from_str("fd00::2")
DNS = ipv6.addr_from_str("fd00::3")


def frame(src: bytes, dst: bytes, proto: int, l4: bytes, hop_limit: int = 64,
          dst_mac: bytes = b"\x33\x33\x00\x00\x00\x01", ext: bytes = b"",
          first: int | None = None) -> bytes:
    """A plain Ethernet frame from the guest; ``ext`` goes between the header and ``l4``."""
    head = ipv6.header(src, dst, proto if first is None else first, len(ext) + len(l4),
                       hop_limit)
    return ethernet.header(dst_mac, GUEST_MAC, ethernet.ETHERTYPE_IPV6) + head + ext + l4


def icmp_frame(src: bytes, dst: bytes, kind: int, body: bytes, hop_limit: int = 255,
               **kw: object) -> bytes:
    return frame(src, dst, ipv6.PROTO_ICMPV6, bytes(icmpv6.build(kind, 0, body, src, dst)),
                 hop_limit, **kw)  # type: ignore[arg-type]


def solicit(target: bytes, src: bytes = GUEST_LL, options: bytes | None = None,
            hop_limit: int = 255, dst: bytes | None = None) -> bytes:
    opts = icmpv6.lladdr_option(icmpv6.OPT_SOURCE_LLADDR, GUEST_MAC) if options is None \
        else options
    return icmp_frame(src, dst or ipv6.solicited_node(target), icmpv6.NEIGHBOR_SOLICIT,
                      bytes(4) + target + opts, hop_limit)


def router_solicit(src: bytes = GUEST_LL, options: bytes = b"", hop_limit: int = 255) -> bytes:
    return icmp_frame(src, ipv6.ALL_ROUTERS, icmpv6.ROUTER_SOLICIT, bytes(4) + options,
                      hop_limit)


def echo(dst: bytes, src: bytes = GUEST_GLOBAL, data: bytes = b"ping!") -> bytes:
    return icmp_frame(src, dst, icmpv6.ECHO_REQUEST, struct.pack("!HH", 7, 9) + data, 64)


class Parsed:
    """One frame we sent, parsed (checksum verified)."""

    def __init__(self, raw: bytes) -> None:
        eth = ethernet.EthernetFrame(memoryview(raw))
        assert eth.ethertype == ethernet.ETHERTYPE_IPV6
        self.dst_mac = eth.dst
        self.ip = ipv6.Ipv6Packet(eth.payload)
        if self.ip.proto == ipv6.PROTO_ICMPV6:
            self.icmp = icmpv6.Icmpv6Message(self.ip.payload, self.ip.src, self.ip.dst)

    def nd_options(self, fixed: int) -> dict[int, bytes]:
        return {k: bytes(v) for k, v in icmpv6.parse_nd_options(self.icmp.buf[fixed:])}


class Rig:
    def __init__(self, **cfg: object) -> None:
        self.config = NetConfig(vnet_hdr=False, offload=False, enable_ipv6=True,
                                **cfg)  # type: ignore[arg-type]
        self.sink = CaptureSink()
        self.stack = Stack(self.config, self.sink, FakeHost())
        self.clock = FakeClock(self.stack.timers)

    def send(self, raw: bytes) -> list[Parsed]:
        self.stack.receive_frame(memoryview(raw), self.clock.now)
        self.stack.run_timers(self.clock.now)
        return [Parsed(f) for f in self.sink.take()]

    def counter(self, name: str) -> int:
        return self.stack.counters.get(name, 0)

    def without_ras(self, out: list[Parsed]) -> list[Parsed]:
        return [p for p in out if p.icmp.type != icmpv6.ROUTER_ADVERT]


@pytest.fixture
def rig() -> Rig:
    return Rig()


# ---- neighbor discovery ---------------------------------------------------------------

@pytest.mark.parametrize("target", [GATEWAY, DNS, ipv6.addr_from_str("fe80::2")])
def test_neighbor_solicitation_for_our_addresses_is_answered(rig: Rig, target: bytes) -> None:
    out = rig.without_ras(rig.send(solicit(target)))
    assert len(out) == 1
    na = out[0]
    assert na.icmp.type == icmpv6.NEIGHBOR_ADVERT
    assert na.ip.hop_limit == 255 and na.ip.src == target and na.ip.dst == GUEST_LL
    assert na.dst_mac == GUEST_MAC
    assert bytes(na.icmp.buf[8:24]) == target
    flags = na.icmp.buf[4]
    assert flags & icmpv6.NA_ROUTER and flags & icmpv6.NA_SOLICITED
    assert na.nd_options(icmpv6.NA_FIXED_LEN)[icmpv6.OPT_TARGET_LLADDR] == rig.config.our_mac


def test_dad_probe_is_never_answered(rig: Rig) -> None:
    """A guest's DAD probe (from ::) for any address, ours included, gets no conflict."""
    for target in (GUEST_GLOBAL, GATEWAY, DNS, rig.config.link_local6):
        assert rig.without_ras(rig.send(solicit(target, src=ipv6.UNSPECIFIED, options=b""))) \
            == []
    assert rig.counter("ndp.dad_probe") == 3  # for our addresses
    assert rig.counter("drop.ipv6.multicast") == 1  # a group we do not listen to


def test_solicitation_for_another_address_is_ignored(rig: Rig) -> None:
    other = ipv6.addr_from_str("fd00::77")
    assert rig.without_ras(rig.send(solicit(other))) == []
    assert rig.counter("drop.ipv6.multicast") == 1  # its solicited-node group is not ours
    assert rig.without_ras(rig.send(solicit(other, dst=GATEWAY))) == []
    assert rig.counter("ndp.ns_not_ours") == 1


def test_router_solicitation_gets_an_advertisement_with_prefix_mtu_and_dns() -> None:
    rig = Rig(search_domains=["example.test", "corp.test"], mtu=1400)
    out = rig.send(router_solicit())
    assert [p.icmp.type for p in out] == [icmpv6.ROUTER_ADVERT]
    ra = out[0]
    assert ra.ip.src == rig.config.link_local6 and ra.ip.dst == ipv6.ALL_NODES
    assert ra.ip.hop_limit == 255 and ra.dst_mac == b"\x33\x33\x00\x00\x00\x01"
    lifetime = struct.unpack_from("!H", ra.icmp.buf, 6)[0]
    assert lifetime > 0 and ra.icmp.buf[5] & icmpv6.RA_FLAG_OTHER
    opts = ra.nd_options(icmpv6.RA_FIXED_LEN)
    assert opts[icmpv6.OPT_SOURCE_LLADDR] == rig.config.our_mac
    assert struct.unpack_from("!I", opts[icmpv6.OPT_MTU], 2)[0] == 1400
    prefix = opts[icmpv6.OPT_PREFIX_INFO]
    assert prefix[0] == 64 and prefix[1] & icmpv6.PREFIX_AUTONOMOUS and \
        prefix[1] & icmpv6.PREFIX_ON_LINK
    assert prefix[14:30] == ipaddress.IPv6Address("fd00::").packed
    assert opts[icmpv6.OPT_RDNSS][6:] == DNS
    assert b"\x07example\x04test\x00\x04corp\x04test\x00" in opts[icmpv6.OPT_DNSSL]


def test_no_dns_options_with_disable_dns() -> None:
    rig = Rig(disable_dns=True, search_domains=["example.test"])
    opts = rig.send(router_solicit())[0].nd_options(icmpv6.RA_FIXED_LEN)
    assert icmpv6.OPT_RDNSS not in opts and icmpv6.OPT_DNSSL not in opts


def test_other_prefix_is_advertised() -> None:
    rig = Rig(network6=ipaddress.IPv6Network("fd12:3456:789a:1::/64"))
    out = rig.send(solicit(ipv6.addr_from_str("fd12:3456:789a:1::2")))
    assert [p.icmp.type for p in rig.without_ras(out)] == [icmpv6.NEIGHBOR_ADVERT]
    ra = [p for p in out if p.icmp.type == icmpv6.ROUTER_ADVERT][0]
    prefix = ra.nd_options(icmpv6.RA_FIXED_LEN)[icmpv6.OPT_PREFIX_INFO]
    assert prefix[14:30] == ipaddress.IPv6Address("fd12:3456:789a:1::").packed


def test_solicitation_flood_gets_one_advertisement_per_three_seconds(rig: Rig) -> None:
    sent = sum(len(rig.send(router_solicit())) for _ in range(50))
    assert sent == 1
    rig.clock.advance(ndp.MIN_DELAY_BETWEEN_RAS)
    assert [p.icmp.type for p in (Parsed(f) for f in rig.sink.take())] == [icmpv6.ROUTER_ADVERT]


def test_unsolicited_advertisements_start_with_the_guest_and_repeat(rig: Rig) -> None:
    rig.clock.advance(3600)
    assert rig.sink.take() == []  # nothing before the guest speaks IPv6
    rig.send(solicit(GATEWAY, src=ipv6.UNSPECIFIED, options=b""))  # its first DAD probe
    assert rig.counter("ndp.router_advert") == 1
    rig.clock.advance(3 * ndp.MAX_INITIAL_RTR_ADVERT_INTERVAL)
    assert rig.counter("ndp.router_advert") == ndp.MAX_INITIAL_RTR_ADVERTISEMENTS
    rig.clock.advance(10 * ndp.RA_INTERVAL)
    assert rig.counter("ndp.router_advert") == ndp.MAX_INITIAL_RTR_ADVERTISEMENTS + 10


def test_guest_addresses_are_learned(rig: Rig) -> None:
    rig.send(solicit(GATEWAY, src=ipv6.UNSPECIFIED, options=b""))
    assert rig.stack.ndp is not None and rig.stack.ndp.guest_addr6 is None
    rig.send(router_solicit())
    rig.send(echo(GATEWAY))
    assert rig.stack.ndp.guest_link_local6 == GUEST_LL
    assert rig.stack.ndp.guest_addr6 == GUEST_GLOBAL


# ---- echo -----------------------------------------------------------------------------

@pytest.mark.parametrize("dst", [GATEWAY, DNS])
def test_echo_to_gateway_and_dns_is_answered(rig: Rig, dst: bytes) -> None:
    out = rig.without_ras(rig.send(echo(dst, data=b"x" * 1000)))
    assert len(out) == 1
    reply = out[0]
    assert reply.icmp.type == icmpv6.ECHO_REPLY
    assert reply.ip.src == dst and reply.ip.dst == GUEST_GLOBAL and reply.dst_mac == GUEST_MAC
    assert (reply.icmp.ident, reply.icmp.seq) == (7, 9)
    assert bytes(reply.icmp.buf[8:]) == b"x" * 1000


def test_echo_elsewhere_is_not_answered_here(rig: Rig) -> None:
    # It goes to the ICMP engine's relay (tests/stack/test_icmpv6_relay.py), not NDP.
    assert rig.without_ras(rig.send(echo(ipv6.addr_from_str("2001:db8::1")))) == []
    assert rig.counter("icmpv6.echo_reply") == 0


def test_ipv6_is_dropped_without_enable_ipv6() -> None:
    sink = CaptureSink()
    stack = Stack(NetConfig(vnet_hdr=False, offload=False), sink, FakeHost())
    stack.receive_frame(memoryview(echo(GATEWAY)), 0.0)
    assert sink.take() == [] and stack.counters["drop.ethertype"] == 1


# ---- DHCPv6 ---------------------------------------------------------------------------

def info_request(*options: tuple[int, bytes], src: bytes = GUEST_LL,
                 msg_type: int = dhcpv6.INFORMATION_REQUEST) -> bytes:
    msg = dhcpv6.build(msg_type, b"\x01\x02\x03", options)
    datagram = build_udp6(src, dhcpv6.CLIENT_PORT, ipv6.ALL_DHCP_AGENTS, dhcpv6.SERVER_PORT,
                          msg)
    return frame(src, ipv6.ALL_DHCP_AGENTS, ipv6.PROTO_UDP, datagram,
                 dst_mac=b"\x33\x33\x00\x01\x00\x02")


def dhcp_replies(rig: Rig, raw: bytes) -> list[dhcpv6.Dhcpv6Message]:
    out = [p for p in rig.send(raw) if p.ip.proto == ipv6.PROTO_UDP]
    for p in out:
        udp = p.ip.payload
        assert partial_sum(udp, ipv6.pseudo_header_sum(p.ip.src, p.ip.dst, 17, len(udp))) == 0
        assert p.ip.src == rig.config.link_local6 and p.ip.dst == GUEST_LL
        assert struct.unpack_from("!HH", udp) == (547, 546)
    return [dhcpv6.Dhcpv6Message(p.ip.payload[8:]) for p in out]


def test_information_request_gets_dns_and_search_list() -> None:
    rig = Rig(search_domains=["example.test"])
    client_id = dhcpv6.duid_ll(GUEST_MAC)
    replies = dhcp_replies(rig, info_request((dhcpv6.OPT_CLIENTID, client_id),
                                             (dhcpv6.OPT_ORO, b"\x00\x17\x00\x18")))
    assert len(replies) == 1
    reply = replies[0]
    assert reply.msg_type == dhcpv6.REPLY and reply.transaction_id == b"\x01\x02\x03"
    assert reply.option(dhcpv6.OPT_DNS_SERVERS) == DNS
    assert bytes(reply.option(dhcpv6.OPT_DOMAIN_LIST) or b"") == b"\x07example\x04test\x00"
    assert bytes(reply.option(dhcpv6.OPT_CLIENTID) or b"") == client_id
    assert bytes(reply.option(dhcpv6.OPT_SERVERID) or b"") == \
        dhcpv6.duid_ll(rig.config.our_mac)


@pytest.mark.parametrize("request_frame, counter", [
    (info_request(msg_type=dhcpv6.SOLICIT), "dhcpv6.ignored.1"),
    (info_request((dhcpv6.OPT_IA_NA, bytes(12))), "dhcpv6.drop.ia_option"),
    (info_request((dhcpv6.OPT_SERVERID, b"\x00\x03\x00\x01" + bytes(6))),
     "dhcpv6.drop.other_server"),
    (info_request(src=ipv6.UNSPECIFIED), "dhcpv6.drop.bad_source"),
])
def test_dhcpv6_messages_not_answered(rig: Rig, request_frame: bytes, counter: str) -> None:
    assert dhcp_replies(rig, request_frame) == []
    assert rig.counter(counter) == 1


def test_dhcpv6_without_checksum_is_malformed(rig: Rig) -> None:
    raw = bytearray(info_request())
    udp_at = ethernet.HEADER_LEN + ipv6.HEADER_LEN
    raw[udp_at + 6:udp_at + 8] = b"\x00\x00"
    assert dhcp_replies(rig, bytes(raw)) == []
    assert rig.counter("drop.malformed.udp") == 1


# ---- hostile input --------------------------------------------------------------------

def _hbh(options: bytes, next_header: int) -> bytes:
    body = options + bytes(-(len(options) + 2) % 8)
    return bytes((next_header, (len(body) + 2) // 8 - 1)) + body


def _echo_l4(dst: bytes = GATEWAY) -> bytes:
    return bytes(icmpv6.build(icmpv6.ECHO_REQUEST, 0, b"\x00\x01\x00\x01", GUEST_GLOBAL, dst))


HOSTILE = {
    "ns hop limit 64": (solicit(GATEWAY, hop_limit=64), "ndp.drop.hop_limit"),
    "rs hop limit 1": (router_solicit(hop_limit=1), "ndp.drop.hop_limit"),
    "ns zero-length option": (solicit(GATEWAY, options=b"\x01\x00" + bytes(6)),
                              "drop.malformed.icmpv6"),
    "rs zero-length option": (router_solicit(options=b"\x03\x00" + bytes(6)),
                              "drop.malformed.icmpv6"),
    "ns option past the end": (solicit(GATEWAY, options=b"\x01\x04" + bytes(6)),
                               "drop.malformed.icmpv6"),
    "ns truncated": (icmp_frame(GUEST_LL, ipv6.solicited_node(GATEWAY),
                                icmpv6.NEIGHBOR_SOLICIT, bytes(4) + GATEWAY[:8]),
                     "ndp.drop.bad_message"),
    "ns for multicast target": (solicit(ipv6.ALL_NODES, dst=GATEWAY), "ndp.drop.bad_message"),
    "dad probe with source lladdr": (solicit(GATEWAY, src=ipv6.UNSPECIFIED),
                                     "ndp.drop.bad_message"),
    "rs from :: with source lladdr": (
        router_solicit(src=ipv6.UNSPECIFIED,
                       options=icmpv6.lladdr_option(icmpv6.OPT_SOURCE_LLADDR, GUEST_MAC)),
        "ndp.drop.bad_message"),
    "jumbo payload length 0": (
        ethernet.header(GUEST_MAC, GUEST_MAC, ethernet.ETHERTYPE_IPV6)
        + ipv6.header(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_HOPOPTS, 0)
        + _hbh(b"\xc2\x04" + struct.pack("!I", 70000), 58) + _echo_l4(),
        "drop.malformed.ipv6"),
    "payload length past the frame": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4())[:-4],
        "drop.malformed.ipv6"),
    "hop-by-hop not first": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4(), first=60,
              ext=_hbh(b"", 0) + _hbh(b"", 58)), "drop.malformed.ipv6"),
    "extension header past the end": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, b"", first=60,
              ext=bytes((58, 5)) + bytes(6)), "drop.malformed.ipv6"),
    "endless extension chain": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4(), first=60,
              ext=_hbh(b"", 60) * 20 + _hbh(b"", 58)), "drop.malformed.ipv6"),
    "unknown option to discard": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4(), first=60,
              ext=_hbh(b"\x87\x02\x00\x00", 58)), "drop.malformed.ipv6"),
    "routing header with segments left": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4(), first=43,
              ext=bytes((58, 0, 0, 1)) + bytes(4)), "drop.malformed.ipv6"),
    "fragment not a multiple of 8 with more to come": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4() + bytes(4), first=44,
              ext=bytes((58, 0, 0, 1)) + bytes(4)), "drop.frag.malformed"),
    "fragment header truncated": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, b"", first=44,
              ext=bytes((58, 0, 0, 1))), "drop.malformed.ipv6"),
    "bad icmpv6 checksum": (
        frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, b"\x80\x00\x12\x34" + bytes(8)),
        "drop.malformed.icmpv6"),
    "version 4 in an ipv6 frame": (
        ethernet.header(GUEST_MAC, GUEST_MAC, ethernet.ETHERTYPE_IPV6) + b"\x45" + bytes(60),
        "drop.malformed.ipv6"),
    "short header": (ethernet.header(GUEST_MAC, GUEST_MAC, ethernet.ETHERTYPE_IPV6)
                     + b"\x60" + bytes(20), "drop.malformed.ipv6"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_ipv6_input_is_dropped_and_counted(rig: Rig, name: str) -> None:
    raw, counter = HOSTILE[name]
    assert rig.without_ras(rig.send(raw)) == []
    assert rig.counter(counter) == 1, rig.stack.counters
    assert not any(k.startswith("stack.error") for k in rig.stack.counters)
    # The next well-formed request is still answered.
    assert [p.icmp.type for p in rig.without_ras(rig.send(echo(GATEWAY)))] == \
        [icmpv6.ECHO_REPLY]


def test_extension_headers_that_may_be_skipped_are(rig: Rig) -> None:
    """Padding and Router Alert in hop-by-hop, a destination options header, a finished
    routing header: the echo behind them is answered."""
    ext = _hbh(b"\x05\x02\x00\x00\x01\x00", 60) + _hbh(b"\x00\x00", 43) + \
        bytes((58, 0, 0, 0)) + bytes(4)
    out = rig.without_ras(rig.send(frame(GUEST_GLOBAL, GATEWAY, ipv6.PROTO_ICMPV6, _echo_l4(),
                                         first=0, ext=ext)))
    assert [p.icmp.type for p in out] == [icmpv6.ECHO_REPLY]
