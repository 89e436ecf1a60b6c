"""Byte-literal round trips for pyslirp.wire.vnet (struct virtio_net_hdr_mrg_rxbuf, 12
bytes, little-endian as the kernel on this host writes it)."""

from __future__ import annotations

import pytest

from pyslirp.wire import vnet
from pyslirp.wire.errors import MalformedPacket

# NEEDS_CSUM, GSO TCPv4, hdr_len 66, gso_size 1448, csum_start 34, csum_offset 16,
# num_buffers 0: a TSO super-frame as the kernel hands it over.
TSO = bytes.fromhex("0101" "4200" "a805" "2200" "1000" "0000")
# DATA_VALID, no GSO: a frame whose checksum the kernel already checked.
VALID = bytes.fromhex("0200" "0000" "0000" "0000" "0000" "0000")


def test_parse() -> None:
    h = vnet.VnetHeader(memoryview(TSO + b"frame"))
    assert (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset) == (
        vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1448, 34, 16)
    assert vnet.unpack(TSO) == (1, 1, 66, 1448, 34, 16, 0)


def test_build_gives_the_same_bytes() -> None:
    assert vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, 66, 1448, 34, 16) == TSO
    assert vnet.build(vnet.F_DATA_VALID) == VALID


def test_flags_and_types_are_the_kernel_values() -> None:
    assert (vnet.F_NEEDS_CSUM, vnet.F_DATA_VALID) == (1, 2)
    assert (vnet.GSO_NONE, vnet.GSO_TCPV4, vnet.GSO_UDP, vnet.GSO_TCPV6, vnet.GSO_UDP_L4,
            vnet.GSO_ECN) == (0, 1, 3, 4, 5, 0x80)
    h = vnet.VnetHeader(memoryview(vnet.build(0, vnet.GSO_TCPV6 | vnet.GSO_ECN)))
    assert h.gso_type & ~vnet.GSO_ECN == vnet.GSO_TCPV6 and h.gso_type & vnet.GSO_ECN


def test_plain_is_all_zero() -> None:
    assert vnet.PLAIN == bytes(vnet.HEADER_LEN) == vnet.build()
    h = vnet.VnetHeader(memoryview(vnet.PLAIN))
    assert (h.flags, h.gso_type, h.gso_size) == (0, vnet.GSO_NONE, 0)


def test_short_header_says_how_short() -> None:
    with pytest.raises(MalformedPacket, match="vnet: 11 bytes is shorter than the 12-byte"):
        vnet.VnetHeader(memoryview(TSO[:11]))
