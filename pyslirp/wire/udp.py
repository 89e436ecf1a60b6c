"""UDP header (RFC 768)."""

from __future__ import annotations

import struct

from pyslirp.wire import ipv6
from pyslirp.wire.checksum import finish, partial_sum, pseudo_header_sum
from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 8
PROTO = 17

_HEADER = struct.Struct("!HHHH")


class UdpDatagram:
    """View of a UDP datagram inside an IPv4 packet.

    ``src_ip``/``dst_ip`` are needed only to verify the checksum; pass
    ``verify_checksum=False`` when the link said the checksum is already valid
    (or only partial, vnet NEEDS_CSUM).
    """

    __slots__ = ("buf", "src_port", "dst_port", "length", "csum", "payload")

    def __init__(self, buf: memoryview, src_ip: bytes = b"", dst_ip: bytes = b"",
                 verify_checksum: bool = False) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"udp: {len(buf)} bytes is shorter than a header")
        self.src_port, self.dst_port, self.length, self.csum = _HEADER.unpack_from(buf)
        if self.length < HEADER_LEN or self.length > len(buf):
            raise MalformedPacket(f"udp: length {self.length} outside 8..{len(buf)}")
        self.buf = buf[: self.length] if self.length != len(buf) else buf
        if verify_checksum and self.csum != 0 and partial_sum(
                self.buf, pseudo_header_sum(src_ip, dst_ip, PROTO, self.length)) != 0:
            raise MalformedPacket("udp: bad checksum")
        #: The data (a slice, not a copy); an attribute: every datagram's is read.
        self.payload = self.buf[HEADER_LEN:]


def build(src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
          payload: bytes | bytearray | memoryview) -> bytearray:
    """A complete UDP datagram (header + payload) with its checksum."""
    length = HEADER_LEN + len(payload)
    out = bytearray(length)
    _HEADER.pack_into(out, 0, src_port, dst_port, length, 0)
    out[HEADER_LEN:] = payload
    csum = finish(partial_sum(out, pseudo_header_sum(src_ip, dst_ip, PROTO, length)))
    out[6] = csum >> 8
    out[7] = csum & 0xFF
    return out


def build6(src_ip: bytes, src_port: int, dst_ip: bytes, dst_port: int,
           payload: bytes | bytearray | memoryview) -> bytearray:
    """:func:`build` over IPv6: the checksum is mandatory, so a zero sum is sent as 0xFFFF."""
    length = HEADER_LEN + len(payload)
    out = bytearray(length)
    _HEADER.pack_into(out, 0, src_port, dst_port, length, 0)
    out[HEADER_LEN:] = payload
    csum = finish(partial_sum(out, ipv6.pseudo_header_sum(src_ip, dst_ip, PROTO, length)))
    csum = csum or 0xFFFF
    out[6] = csum >> 8
    out[7] = csum & 0xFF
    return out
