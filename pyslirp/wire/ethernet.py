"""Ethernet II framing (IEEE 802.3 with EtherType); no VLAN tags, no FCS."""

from __future__ import annotations

import struct

from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6

_HEADER = struct.Struct("!6s6sH")


class EthernetFrame:
    """View of an Ethernet II header; ``payload`` is a slice, not a copy."""

    __slots__ = ("buf", "dst", "src", "ethertype")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"ethernet: frame of {len(buf)} bytes is shorter than 14")
        self.buf = buf
        self.dst, self.src, self.ethertype = _HEADER.unpack_from(buf)

    @property
    def payload(self) -> memoryview:
        return self.buf[HEADER_LEN:]


def build_header(buf: bytearray | memoryview, offset: int, dst: bytes, src: bytes,
                 ethertype: int) -> None:
    """Write an Ethernet header at ``offset``."""
    _HEADER.pack_into(buf, offset, dst, src, ethertype)


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return _HEADER.pack(dst, src, ethertype)


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
