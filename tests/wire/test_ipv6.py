"""IPv6, ICMPv6 and DHCPv6 wire views: addresses derived as the RFCs say, bad buffers refused."""

from __future__ import annotations

import ipaddress

import pytest

from pyslirp.wire import dhcpv6, icmpv6, ipv6
from pyslirp.wire.errors import MalformedPacket

MAC = bytes.fromhex("52550a000202")


def test_link_local_is_eui64_of_the_mac() -> None:
    # RFC 4291 appendix A: flip the universal/local bit, insert ff:fe in the middle.
    assert ipv6.addr_to_str(ipv6.link_local(MAC)) == "fe80::5055:aff:fe00:202"
    assert ipv6.is_link_local(ipv6.link_local(MAC))
    assert not ipv6.is_link_local(ipv6.addr_from_str("fd00::2"))


def test_solicited_node_and_multicast_mac() -> None:
    addr = ipv6.addr_from_str("fd00::12:3456")
    assert ipv6.addr_to_str(ipv6.solicited_node(addr)) == "ff02::1:ff12:3456"
    assert ipv6.multicast_mac(ipv6.ALL_NODES) == bytes.fromhex("333300000001")


def test_header_round_trip_and_padding_cut() -> None:
    src, dst = ipv6.addr_from_str("fd00::aa"), ipv6.addr_from_str("fd00::2")
    raw = ipv6.header(src, dst, ipv6.PROTO_UDP, 4, 7) + b"abcd" + bytes(10)
    pkt = ipv6.Ipv6Packet(memoryview(raw))
    assert (pkt.src, pkt.dst, pkt.proto, pkt.hop_limit) == (src, dst, ipv6.PROTO_UDP, 7)
    assert bytes(pkt.payload) == b"abcd"


def test_empty_packet_with_no_next_header_is_fine() -> None:
    raw = ipv6.header(bytes(16), ipv6.ALL_NODES, ipv6.PROTO_NONE, 0)
    assert ipv6.Ipv6Packet(memoryview(raw)).proto == ipv6.PROTO_NONE


@pytest.mark.parametrize("raw", [
    b"\x60" + bytes(10),
    b"\x40" + bytes(39),
    ipv6.header(bytes(16), bytes(16), ipv6.PROTO_UDP, 0),
    ipv6.header(bytes(16), bytes(16), ipv6.PROTO_UDP, 9) + bytes(8),
])
def test_bad_headers_are_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedPacket, match="^ipv6: "):
        ipv6.Ipv6Packet(memoryview(raw))


def test_icmpv6_checksum_covers_the_pseudo_header() -> None:
    src, dst = ipv6.addr_from_str("fe80::1"), ipv6.ALL_NODES
    msg = icmpv6.build(icmpv6.ECHO_REQUEST, 0, b"\x00\x01\x00\x02hi", src, dst)
    assert icmpv6.Icmpv6Message(memoryview(msg), src, dst).seq == 2
    with pytest.raises(MalformedPacket, match="checksum"):
        icmpv6.Icmpv6Message(memoryview(msg), src, ipv6.ALL_ROUTERS)


def test_nd_options_split_and_zero_length_refused() -> None:
    opts = icmpv6.lladdr_option(icmpv6.OPT_SOURCE_LLADDR, MAC) + icmpv6.mtu_option(1500)
    assert [k for k, _ in icmpv6.parse_nd_options(memoryview(opts))] == [1, 5]
    for bad in (b"\x01\x00" + bytes(6), b"\x01\x02" + bytes(6), b"\x01"):
        with pytest.raises(MalformedPacket):
            icmpv6.parse_nd_options(memoryview(bad))


def test_rdnss_and_dnssl_options_are_multiples_of_8() -> None:
    dns = ipaddress.IPv6Address("fd00::3").packed
    assert len(icmpv6.rdnss_option(1800, [dns])) == 24
    dnssl = icmpv6.dnssl_option(1800, dhcpv6.encode_domain_list([(b"example", b"test")]))
    assert len(dnssl) % 8 == 0 and dnssl[1] == len(dnssl) // 8


def test_dhcpv6_round_trip_and_truncated_option() -> None:
    raw = dhcpv6.build(dhcpv6.INFORMATION_REQUEST, b"\xab\xcd\xef",
                       [(dhcpv6.OPT_CLIENTID, dhcpv6.duid_ll(MAC)), (dhcpv6.OPT_ORO, b"\x00\x17")])
    msg = dhcpv6.Dhcpv6Message(memoryview(raw))
    assert msg.msg_type == dhcpv6.INFORMATION_REQUEST and msg.transaction_id == b"\xab\xcd\xef"
    assert bytes(msg.option(dhcpv6.OPT_CLIENTID) or b"") == b"\x00\x03\x00\x01" + MAC
    with pytest.raises(MalformedPacket, match="dhcpv6"):
        dhcpv6.Dhcpv6Message(memoryview(raw[:-1]))
