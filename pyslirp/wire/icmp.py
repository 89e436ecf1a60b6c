"""ICMP for IPv4 (RFC 792): echo and the error messages the stack sends."""

from __future__ import annotations

import struct

from pyslirp.wire.checksum import checksum, partial_sum
from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 8
PROTO = 1

ECHO_REPLY = 0
DEST_UNREACH = 3
ECHO_REQUEST = 8
TIME_EXCEEDED = 11

# Destination unreachable codes (RFC 792, RFC 1122 3.2.2.1)
NET_UNREACH = 0
HOST_UNREACH = 1
PROTO_UNREACH = 2
PORT_UNREACH = 3
FRAG_NEEDED = 4

_HEADER = struct.Struct("!BBHHH")


class IcmpMessage:
    """View of an ICMP message. For echo, ``ident``/``seq`` are meaningful."""

    __slots__ = ("buf", "type", "code", "csum", "ident", "seq")

    def __init__(self, buf: memoryview, verify_checksum: bool = True) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"icmp: {len(buf)} bytes is shorter than a header")
        self.type, self.code, self.csum, self.ident, self.seq = _HEADER.unpack_from(buf)
        if verify_checksum and partial_sum(buf) != 0:
            raise MalformedPacket("icmp: bad checksum")
        self.buf = buf

    @property
    def payload(self) -> memoryview:
        return self.buf[HEADER_LEN:]


def build(icmp_type: int, code: int, rest: int,
          payload: bytes | bytearray | memoryview) -> bytearray:
    """An ICMP message; ``rest`` is the 32-bit field after the checksum."""
    out = bytearray(HEADER_LEN + len(payload))
    struct.pack_into("!BBHI", out, 0, icmp_type, code, 0, rest)
    out[HEADER_LEN:] = payload
    csum = checksum(out)
    out[2] = csum >> 8
    out[3] = csum & 0xFF
    return out


def build_echo(icmp_type: int, ident: int, seq: int,
               payload: bytes | bytearray | memoryview) -> bytearray:
    return build(icmp_type, 0, (ident << 16) | seq, payload)


def build_error(icmp_type: int, code: int, original_ip_packet: bytes | bytearray | memoryview,
                next_hop_mtu: int = 0) -> bytearray:
    """An error quoting the offending packet's IP header and first 8 bytes of data.

    (RFC 792; RFC 1812 4.3.2.3 allows more, but 28 bytes is what every stack parses.)
    """
    ihl = (original_ip_packet[0] & 0x0F) * 4 if original_ip_packet else 20
    quote = bytes(original_ip_packet[: ihl + 8])
    return build(icmp_type, code, next_hop_mtu & 0xFFFF, quote)
