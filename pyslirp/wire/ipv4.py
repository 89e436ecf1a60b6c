"""IPv4 header (RFC 791).

Theory of operation
-------------------
:class:`Ipv4Packet` validates what every consumer relies on, once: version 4,
IHL >= 5, total length within the buffer (trailing Ethernet padding is cut
off), and, unless the caller says the frame came with a valid checksum, the
header checksum. Options are skipped, never interpreted. Fragments are
recognised (``more_fragments``/``frag_offset``) and left to the stack's
reassembly. :func:`build_header` writes a 20-byte header with checksum.
"""

from __future__ import annotations

import socket
import struct

from pyslirp.wire.checksum import checksum, partial_sum
from pyslirp.wire.errors import MalformedPacket

MIN_HEADER_LEN = 20
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF

_FIXED = struct.Struct("!BBHHHBBH4s4s")


class Ipv4Packet:
    """View of an IPv4 packet. ``payload`` is the L4 part, bounded by total length."""

    __slots__ = ("buf", "header_len", "tos", "total_len", "ident", "flags_frag", "ttl",
                 "proto", "src", "dst", "payload")

    def __init__(self, buf: memoryview, verify_checksum: bool = True) -> None:
        if len(buf) < MIN_HEADER_LEN:
            raise MalformedPacket(f"ipv4: {len(buf)} bytes is shorter than a header")
        (ver_ihl, self.tos, self.total_len, self.ident, self.flags_frag, self.ttl,
         self.proto, _csum, self.src, self.dst) = _FIXED.unpack_from(buf)
        if ver_ihl >> 4 != 4:
            raise MalformedPacket(f"ipv4: version {ver_ihl >> 4}")
        self.header_len = (ver_ihl & 0x0F) * 4
        if self.header_len < MIN_HEADER_LEN:
            raise MalformedPacket(f"ipv4: header length {self.header_len} < 20")
        if self.total_len < self.header_len or self.total_len > len(buf):
            raise MalformedPacket(
                f"ipv4: total length {self.total_len} outside {self.header_len}..{len(buf)}")
        if verify_checksum and partial_sum(buf[: self.header_len]) != 0:
            raise MalformedPacket("ipv4: bad header checksum")
        self.buf = buf[: self.total_len] if self.total_len != len(buf) else buf
        #: The L4 part (a slice, not a copy): an attribute, not a property, because
        #: every packet's is read, once or twice (a call fewer each time).
        self.payload = self.buf[self.header_len:]

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & FLAG_MF)

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes."""
        return (self.flags_frag & OFFSET_MASK) * 8

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | OFFSET_MASK))


def build_header(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes, proto: int,
                 payload_len: int, ident: int = 0, ttl: int = 64, flags: int = FLAG_DF,
                 tos: int = 0) -> None:
    """Write a 20-byte IPv4 header (with checksum) at ``offset``."""
    _FIXED.pack_into(buf, offset, 0x45, tos, MIN_HEADER_LEN + payload_len, ident, flags, ttl,
                     proto, 0, src, dst)
    csum = checksum(memoryview(buf)[offset:offset + MIN_HEADER_LEN])
    buf[offset + 10] = csum >> 8
    buf[offset + 11] = csum & 0xFF


def addr_to_str(addr: bytes) -> str:
    return socket.inet_ntoa(addr)


def addr_from_str(text: str) -> bytes:
    return socket.inet_aton(text)
