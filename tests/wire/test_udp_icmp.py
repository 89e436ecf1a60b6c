"""Byte-literal round trips for pyslirp.wire.udp and pyslirp.wire.icmp.

The literals were produced by scapy once and are checked here without it, so
a change in our builders or views shows up as a byte difference.
"""

from __future__ import annotations

import pytest

from pyslirp.wire import icmp, udp
from pyslirp.wire.errors import MalformedPacket

GUEST = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])

# 10.0.2.15:12345 -> 10.0.2.2:53, payload b"hello"
UDP_HELLO = bytes.fromhex("30390035000d738368656c6c6f")
# 10.0.2.15:1000 -> 10.0.2.2:2000, payload 0xdc11: the sum is 0xffff, so the
# computed checksum is 0, which UDP must send as 0xffff (RFC 768).
UDP_CSUM_ZERO = bytes.fromhex("03e807d0000affffdc11")

ECHO_REQUEST = bytes.fromhex("08005435123400016162636465666768")
ECHO_REPLY = bytes.fromhex("00005c35123400016162636465666768")
# 10.0.2.15:40000 -> 198.18.0.1:9, payload b"xyzxyzxyz", IP ID 7
ORIGINAL = bytes.fromhex(
    "45000025000700004011a89f0a00020fc61200019c4000090011327a78797a78797a78797a")
PORT_UNREACH = bytes.fromhex(
    "03032e280000000045000025000700004011a89f0a00020fc61200019c4000090011327a")
FRAG_NEEDED_1400 = bytes.fromhex(
    "030428af0000057845000025000700004011a89f0a00020fc61200019c4000090011327a")


class TestUdp:
    def test_parse(self) -> None:
        d = udp.UdpDatagram(memoryview(UDP_HELLO), GUEST, GATEWAY, verify_checksum=True)
        assert (d.src_port, d.dst_port, d.length, d.csum) == (12345, 53, 13, 0x7383)
        assert bytes(d.payload) == b"hello"

    def test_emit(self) -> None:
        assert bytes(udp.build(GUEST, 12345, GATEWAY, 53, b"hello")) == UDP_HELLO

    def test_emit_zero_checksum_is_sent_as_ffff(self) -> None:
        assert bytes(udp.build(GUEST, 1000, GATEWAY, 2000, b"\xdc\x11")) == UDP_CSUM_ZERO
        udp.UdpDatagram(memoryview(UDP_CSUM_ZERO), GUEST, GATEWAY, verify_checksum=True)

    def test_bad_checksum_rejected(self) -> None:
        bad = bytearray(UDP_HELLO)
        bad[-1] ^= 1
        with pytest.raises(MalformedPacket, match="udp: bad checksum"):
            udp.UdpDatagram(memoryview(bad), GUEST, GATEWAY, verify_checksum=True)
        # ... but accepted when the link vouched for it.
        udp.UdpDatagram(memoryview(bad), GUEST, GATEWAY, verify_checksum=False)

    def test_no_checksum_accepted(self) -> None:
        no_csum = bytearray(UDP_HELLO)
        no_csum[6:8] = b"\0\0"
        d = udp.UdpDatagram(memoryview(no_csum), GUEST, GATEWAY, verify_checksum=True)
        assert bytes(d.payload) == b"hello"

    def test_trailing_bytes_cut_by_length(self) -> None:
        d = udp.UdpDatagram(memoryview(UDP_HELLO + b"\0\0\0"), GUEST, GATEWAY,
                            verify_checksum=True)
        assert bytes(d.payload) == b"hello"

    @pytest.mark.parametrize("data", [
        UDP_HELLO[:7],                      # shorter than a header
        UDP_HELLO[:4] + b"\x00\x07" + UDP_HELLO[6:],   # length < 8
        UDP_HELLO[:4] + b"\x00\x0e" + UDP_HELLO[6:],   # length beyond the buffer
    ])
    def test_malformed(self, data: bytes) -> None:
        with pytest.raises(MalformedPacket, match="^udp: "):
            udp.UdpDatagram(memoryview(data))


class TestIcmp:
    def test_parse_echo(self) -> None:
        m = icmp.IcmpMessage(memoryview(ECHO_REQUEST))
        assert (m.type, m.code, m.ident, m.seq) == (icmp.ECHO_REQUEST, 0, 0x1234, 1)
        assert bytes(m.payload) == b"abcdefgh"

    def test_emit_echo(self) -> None:
        assert bytes(icmp.build_echo(icmp.ECHO_REQUEST, 0x1234, 1, b"abcdefgh")) == ECHO_REQUEST
        assert bytes(icmp.build_echo(icmp.ECHO_REPLY, 0x1234, 1, b"abcdefgh")) == ECHO_REPLY

    def test_emit_error_quotes_header_and_8_bytes(self) -> None:
        assert bytes(icmp.build_error(icmp.DEST_UNREACH, icmp.PORT_UNREACH, ORIGINAL)) \
            == PORT_UNREACH

    def test_emit_frag_needed_carries_mtu(self) -> None:
        out = icmp.build_error(icmp.DEST_UNREACH, icmp.FRAG_NEEDED, ORIGINAL, next_hop_mtu=1400)
        assert bytes(out) == FRAG_NEEDED_1400

    def test_parse_error(self) -> None:
        m = icmp.IcmpMessage(memoryview(PORT_UNREACH))
        assert (m.type, m.code) == (icmp.DEST_UNREACH, icmp.PORT_UNREACH)
        assert bytes(m.payload) == ORIGINAL[:28]

    def test_bad_checksum_rejected(self) -> None:
        bad = bytearray(ECHO_REQUEST)
        bad[-1] ^= 0x40
        with pytest.raises(MalformedPacket, match="icmp: bad checksum"):
            icmp.IcmpMessage(memoryview(bad))
        icmp.IcmpMessage(memoryview(bad), verify_checksum=False)

    def test_short(self) -> None:
        with pytest.raises(MalformedPacket, match="^icmp: "):
            icmp.IcmpMessage(memoryview(ECHO_REQUEST[:7]))

    def test_odd_length_payload_checksum(self) -> None:
        # An odd-length message is padded with a zero byte for the sum (RFC 1071).
        out = icmp.build_echo(icmp.ECHO_REQUEST, 1, 2, b"abc")
        icmp.IcmpMessage(memoryview(out))
        assert bytes(out[4:]) == b"\x00\x01\x00\x02abc"
