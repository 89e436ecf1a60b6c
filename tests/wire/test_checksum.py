"""pyslirp.wire.checksum against known vectors (RFC 1071 and worked examples), odd
lengths, and the two encodings of ones' complement zero."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyslirp.wire import checksum as c

# RFC 1071 section 3's example: the words sum to 0xddf2.
RFC1071 = bytes.fromhex("0001f203f4f5f6f7")
# An IPv4 header with its checksum field zeroed; the field is 0xb861.
IP_HEADER = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")


def reference(data: bytes) -> int:
    """The textbook algorithm: add 16-bit words with end-around carry, complement."""
    if len(data) & 1:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize(("data", "expected"), [
    (RFC1071, 0x220D),
    (IP_HEADER, 0xB861),
    (b"\x01", 0xFEFF),                 # odd length: the last byte is the high half
    (b"\x00\x01\xf2", 0x0DFE),
    (RFC1071 + b"\x03", 0x1F0D),
    (b"\x12\x34\x56\x78\x9a", 0xFD52),  # 0x1234 + 0x5678 + 0x9a00 carries
])
def test_known_vectors(data: bytes, expected: int) -> None:
    assert c.checksum(data) == expected == reference(data)
    assert c.checksum(bytearray(data)) == c.checksum(memoryview(data)) == expected


def test_partial_sum_of_the_rfc1071_example() -> None:
    assert c.partial_sum(RFC1071) == 0xDDF2


def test_a_buffer_with_its_checksum_in_place_verifies() -> None:
    field = c.checksum(IP_HEADER)
    whole = IP_HEADER[:10] + field.to_bytes(2, "big") + IP_HEADER[12:]
    assert c.verify(whole)
    assert not c.verify(whole[:10] + (field ^ 1).to_bytes(2, "big") + whole[12:])


def test_sums_chain_through_initial() -> None:
    assert c.checksum(RFC1071[4:], c.partial_sum(RFC1071[:4])) == c.checksum(RFC1071)


@pytest.mark.parametrize("data", [b"", b"\x00\x00", bytes(7), b"\xff\xff", b"\xff\xff" * 3,
                                  b"\x00\x01\xff\xfe"], ids=["empty", "zero", "zeros-odd",
                                                             "ffff", "ffff-x3", "sums-ffff"])
def test_a_zero_sum_gives_0xffff_never_0(data: bytes) -> None:
    # 0 and 0xFFFF both mean zero in ones' complement; the field written is 0xFFFF
    # (RFC 768: a UDP checksum of 0 would mean "none"), and it verifies either way.
    assert c.partial_sum(data) == 0
    assert c.checksum(data) == 0xFFFF
    assert c.finish(0) == 0xFFFF and c.finish(0xFFFF) == 0xFFFF


def test_pseudo_header_sum() -> None:
    # 10.0.2.15 -> 10.0.2.2, UDP, length 13: 0x0a00 + 0x020f + 0x0a00 + 0x0202 + 17 + 13
    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    assert c.pseudo_header_sum(src, dst, 17, 13) == 0x182F
    # The UDP datagram of tests/wire/test_udp_icmp.py (b"hello" to port 53) sums to zero.
    datagram = bytes.fromhex("30390035000d738368656c6c6f")
    assert c.verify(datagram, c.pseudo_header_sum(src, dst, 17, len(datagram)))


@given(st.binary(max_size=300))
def test_matches_the_textbook_algorithm(data: bytes) -> None:
    expected = reference(data)
    # The fast form writes 0xFFFF where the textbook one may give 0 (the same zero).
    assert c.checksum(data) == (expected or 0xFFFF)
