"""Byte-literal round trips for pyslirp.wire.ipv4: parse the bytes, build the same bytes.

The literals were produced by scapy once (the first is also the usual worked example of
the IPv4 header checksum) and are checked here without it.
"""

from __future__ import annotations

import pytest

from pyslirp.wire import ipv4
from pyslirp.wire.errors import MalformedPacket

# 192.168.0.1 -> 192.168.0.199, UDP, total length 115, ID 0, DF, TTL 64.
HEADER = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
PACKET = HEADER + bytes(115 - 20)
# 10.0.2.15 -> 198.18.0.1 with a 4-byte options area (NOP NOP NOP EOL), UDP b"xyz".
WITH_OPTIONS = bytes.fromhex(
    "46000023000700004011a5a00a00020fc6120001010101009c400009000b9ef278797a")
# A middle fragment: ID 0x1234, MF, offset 185 * 8 = 1480, 8 bytes of data.
FRAGMENT = bytes.fromhex("4500001c123420b9401175c20a00020fc61200013132333435363738")


def test_parse() -> None:
    p = ipv4.Ipv4Packet(memoryview(PACKET))
    assert (p.header_len, p.tos, p.total_len, p.ident, p.flags_frag, p.ttl, p.proto) == (
        20, 0, 115, 0, ipv4.FLAG_DF, 64, ipv4.PROTO_UDP)
    assert (ipv4.addr_to_str(p.src), ipv4.addr_to_str(p.dst)) == ("192.168.0.1",
                                                                  "192.168.0.199")
    assert bytes(p.payload) == bytes(95)
    assert not p.is_fragment and not p.more_fragments and p.frag_offset == 0


def test_build_gives_the_same_bytes() -> None:
    buf = bytearray(24)
    ipv4.build_header(buf, 4, ipv4.addr_from_str("192.168.0.1"),
                      ipv4.addr_from_str("192.168.0.199"), ipv4.PROTO_UDP, 95)
    assert bytes(buf) == bytes(4) + HEADER


def test_options_are_skipped() -> None:
    p = ipv4.Ipv4Packet(memoryview(WITH_OPTIONS))
    assert p.header_len == 24 and p.total_len == len(WITH_OPTIONS)
    assert bytes(p.payload) == WITH_OPTIONS[24:]


def test_fragment_fields() -> None:
    p = ipv4.Ipv4Packet(memoryview(FRAGMENT))
    assert p.is_fragment and p.more_fragments and p.frag_offset == 1480
    assert bytes(p.payload) == b"12345678"
    buf = bytearray(20)
    ipv4.build_header(buf, 0, p.src, p.dst, p.proto, 8, ident=0x1234,
                      flags=ipv4.FLAG_MF | 185)
    assert bytes(buf) == FRAGMENT[:20]


def test_last_fragment_is_a_fragment_too() -> None:
    last = bytearray(FRAGMENT)
    last[6] &= ~(ipv4.FLAG_MF >> 8)
    ipv4.build_header(last, 0, bytes(last[12:16]), bytes(last[16:20]), 17, 8, ident=0x1234,
                      flags=185)
    p = ipv4.Ipv4Packet(memoryview(bytes(last)))
    assert p.is_fragment and not p.more_fragments and p.frag_offset == 1480


def test_ethernet_padding_is_cut_off() -> None:
    p = ipv4.Ipv4Packet(memoryview(FRAGMENT + bytes(18)))
    assert len(p.buf) == len(FRAGMENT) and bytes(p.payload) == b"12345678"


def test_checksum_can_be_left_unverified() -> None:
    bad = bytearray(PACKET)
    bad[10] ^= 0xFF
    with pytest.raises(MalformedPacket, match="ipv4: bad header checksum"):
        ipv4.Ipv4Packet(memoryview(bytes(bad)))
    assert ipv4.Ipv4Packet(memoryview(bytes(bad)), verify_checksum=False).total_len == 115


@pytest.mark.parametrize(("raw", "message"), [
    (HEADER[:19], "ipv4: 19 bytes is shorter than a header"),
    (b"\x65" + PACKET[1:], "ipv4: version 6"),
    (b"\x44" + PACKET[1:], r"ipv4: header length 16 < 20"),
    (PACKET[:114], r"ipv4: total length 115 outside 20..114"),
    (HEADER[:2] + b"\x00\x10" + PACKET[4:], r"ipv4: total length 16 outside 20..115"),
], ids=["short", "version", "ihl", "truncated", "total-below-header"])
def test_malformed_headers_say_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedPacket, match=message):
        ipv4.Ipv4Packet(memoryview(raw), verify_checksum=False)


def test_address_text_round_trip() -> None:
    assert ipv4.addr_from_str("10.0.2.15") == bytes([10, 0, 2, 15])
    assert ipv4.addr_to_str(bytes([198, 18, 0, 1])) == "198.18.0.1"
