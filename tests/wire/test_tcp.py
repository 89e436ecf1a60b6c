"""TCP header view and builders: byte-literal round trips, cross-checked with scapy."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyslirp.wire import tcp
from pyslirp.wire.errors import MalformedPacket

SRC = bytes([10, 0, 2, 100])
DST = bytes([93, 184, 216, 34])

# A SYN from Linux: 10.0.2.100:40000 -> 93.184.216.34:80, seq 0x01020304,
# options MSS 1460, SACK-permitted, timestamps (1, 0), NOP, window scale 7.
SYN_BYTES = bytes.fromhex(
    "9c40 0050 01020304 00000000 a0 02 faf0 0000 0000"
    "020405b4 0402080a 00000001 00000000 01030307".replace(" ", ""))


def _with_csum(seg: bytes) -> bytes:
    out = bytearray(seg)
    out[16:18] = b"\0\0"
    c = tcp.segment_checksum(SRC, DST, out)
    out[16:18] = c.to_bytes(2, "big")
    return bytes(out)


def test_parse_syn_fields_and_options() -> None:
    seg = tcp.TcpSegment(memoryview(_with_csum(SYN_BYTES)), SRC, DST, verify_checksum=True)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack) == (40000, 80, 0x01020304, 0)
    assert seg.flags == tcp.SYN and seg.window == 64240 and seg.header_len == 40
    assert seg.payload_len == 0 and seg.seq_len == 1
    o = seg.options()
    assert (o.mss, o.wscale, o.sack_permitted, o.ts_val, o.ts_ecr) == (1460, 7, True, 1, 0)


def test_emit_syn_matches_literal() -> None:
    opts = tcp.syn_options(mss=1460, wscale=7, sack_permitted=True, timestamps=(1, 0))
    built = tcp.build(SRC, DST, 40000, 80, 0x01020304, 0, tcp.SYN, 64240, options=opts)
    assert bytes(built) == _with_csum(SYN_BYTES)


def test_payload_is_a_slice_and_checksum_detects_corruption() -> None:
    seg_bytes = tcp.build(SRC, DST, 1, 2, 100, 200, tcp.ACK | tcp.PSH, 1000, b"hello")
    mv = memoryview(seg_bytes)
    seg = tcp.TcpSegment(mv, SRC, DST, verify_checksum=True)
    assert bytes(seg.payload) == b"hello" and seg.payload.obj is seg_bytes
    seg_bytes[-1] ^= 1
    with pytest.raises(MalformedPacket, match="checksum"):
        tcp.TcpSegment(memoryview(seg_bytes), SRC, DST, verify_checksum=True)
    # Without verification the corrupted segment still parses (the vnet header vouched).
    assert tcp.TcpSegment(memoryview(seg_bytes)).payload_len == 5


@pytest.mark.parametrize("raw", [
    b"\0" * 19,                                   # short
    bytes.fromhex("00010002000000000000000040000000000000000000"),  # offset 16 < 20
    bytes.fromhex("0001000200000000000000006000000000000000"),      # offset 24 > 20 bytes
])
def test_malformed_headers_raise(raw: bytes) -> None:
    with pytest.raises(MalformedPacket):
        tcp.TcpSegment(memoryview(raw))


@pytest.mark.parametrize("opts", [b"\x02", b"\x02\x01\x00\x00", b"\x08\x0a\x00\x00"])
def test_malformed_options_raise(opts: bytes) -> None:
    with pytest.raises(MalformedPacket):
        tcp.parse_options(opts)


def test_odd_option_lengths_are_ignored_and_wscale_capped() -> None:
    o = tcp.parse_options(b"\x02\x03\x05\x03\x03\x0f\x01\x00")
    assert o.mss is None and o.wscale == 14


def test_build_header_rejects_unaligned_options() -> None:
    with pytest.raises(ValueError):
        tcp.build_header(bytearray(40), 0, 1, 2, 0, 0, tcp.SYN, 0, b"\x01\x01\x01")


def test_cross_check_with_scapy() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    IP, TCP = scapy_all.IP, scapy_all.TCP
    pkt = IP(src="10.0.2.100", dst="93.184.216.34") / TCP(
        sport=1234, dport=443, seq=4000000000, ack=17, flags="PA", window=5000,
        options=[("MSS", 1400), ("WScale", 3)]) / b"payload!"
    raw = bytes(pkt)
    ours = tcp.build(SRC, DST, 1234, 443, 4000000000, 17, tcp.PSH | tcp.ACK, 5000, b"payload!",
                     tcp.syn_options(mss=1400, wscale=3))
    seg = tcp.TcpSegment(memoryview(raw)[20:], SRC, DST, verify_checksum=True)
    o = seg.options()
    assert (o.mss, o.wscale) == (1400, 3)
    assert bytes(seg.payload) == b"payload!"
    # scapy orders options as given (MSS, WScale padded with EOL); compare our own
    # segment through scapy instead of byte for byte.
    back = TCP(bytes(ours))
    assert (back.sport, back.dport, back.seq, back.ack, back.window) == (1234, 443, 4000000000,
                                                                         17, 5000)
    assert str(back.flags) == "PA" and bytes(back.payload) == b"payload!"
    assert dict(back.options)["MSS"] == 1400 and dict(back.options)["WScale"] == 3
    chk = IP(src="10.0.2.100", dst="93.184.216.34", proto=6) / TCP(bytes(ours))
    del chk[TCP].chksum
    assert TCP(bytes(chk)[20:]).chksum == back.chksum


def test_sack_blocks_round_trip() -> None:
    opt = tcp.sack_option([(100, 200), (0xFFFFFFF0, 5)])
    assert opt == bytes.fromhex("0101051200000064000000c8fffffff000000005")
    o = tcp.parse_options(opt)
    assert o.sack == [(100, 200), (0xFFFFFFF0, 5)]
    assert tcp.sack_option([]) == b""
    assert len(tcp.sack_option([(1, 2)] * 6)) == 4 + 32  # at most 4 blocks fit
    assert tcp.parse_options(b"\x05\x0b" + bytes(9)).sack == []  # odd length ignored


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFF), st.integers(0, 0xFFFF),
       st.binary(max_size=100), st.sampled_from([b"", tcp.syn_options(mss=1460, wscale=3),
                                                 tcp.sack_option([(1, 2), (3, 4)])]))
def test_build_then_parse_round_trips(sport: int, dport: int, seq: int, ack: int, flags: int,
                                      window: int, payload: bytes, options: bytes) -> None:
    raw = tcp.build(SRC, DST, sport, dport, seq, ack, flags, window, payload, options)
    seg = tcp.TcpSegment(memoryview(raw), SRC, DST, verify_checksum=True)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags, seg.window) == (
        sport, dport, seq, ack, flags, window)
    assert bytes(seg.payload) == payload and seg.header_len == 20 + len(options)
    seg.options()


@given(st.binary(max_size=40))
def test_option_parsing_raises_only_malformed_packet(raw: bytes) -> None:
    with contextlib.suppress(MalformedPacket):
        tcp.parse_options(raw)
