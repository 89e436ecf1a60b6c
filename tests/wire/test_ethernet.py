"""Byte-literal round trips for pyslirp.wire.ethernet."""

from __future__ import annotations

import pytest

from pyslirp.wire import ethernet
from pyslirp.wire.errors import MalformedPacket

GUEST_MAC = bytes.fromhex("66696895ca9c")
OUR_MAC = bytes.fromhex("52550a000202")
# 52:55:0a:00:02:02 -> 66:69:68:95:ca:9c, IPv4, then the first payload bytes.
FRAME = bytes.fromhex("66696895ca9c" "52550a000202" "0800" "4500")


def test_parse() -> None:
    f = ethernet.EthernetFrame(memoryview(FRAME))
    assert (f.dst, f.src, f.ethertype) == (GUEST_MAC, OUR_MAC, ethernet.ETHERTYPE_IPV4)
    assert bytes(f.payload) == b"\x45\x00"


def test_payload_is_a_view_not_a_copy() -> None:
    buf = bytearray(FRAME)
    f = ethernet.EthernetFrame(memoryview(buf))
    buf[14] = 0x46
    assert f.payload[0] == 0x46


def test_build_gives_the_same_bytes() -> None:
    assert ethernet.header(GUEST_MAC, OUR_MAC, ethernet.ETHERTYPE_IPV4) == FRAME[:14]
    buf = bytearray(16)
    ethernet.build_header(buf, 2, GUEST_MAC, OUR_MAC, ethernet.ETHERTYPE_IPV4)
    assert bytes(buf) == bytes(2) + FRAME[:14]


def test_a_header_alone_has_an_empty_payload() -> None:
    f = ethernet.EthernetFrame(memoryview(FRAME[:14]))
    assert bytes(f.payload) == b""


def test_short_frame_says_how_short() -> None:
    with pytest.raises(MalformedPacket, match="ethernet: frame of 13 bytes is shorter than 14"):
        ethernet.EthernetFrame(memoryview(FRAME[:13]))


def test_mac_to_text() -> None:
    # Parsing MAC text is netparams.parse_mac's (tests/test_netparams.py).
    assert ethernet.mac_to_str(GUEST_MAC) == "66:69:68:95:ca:9c"
