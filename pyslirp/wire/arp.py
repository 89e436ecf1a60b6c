"""ARP for IPv4 over Ethernet (RFC 826).

Only the Ethernet/IPv4 form (htype 1, ptype 0x0800, hlen 6, plen 4) is
accepted; anything else raises :class:`MalformedPacket`.
"""

from __future__ import annotations

import struct

from pyslirp.wire.errors import MalformedPacket

LEN = 28
OP_REQUEST = 1
OP_REPLY = 2

_ARP = struct.Struct("!HHBBH6s4s6s4s")


class ArpPacket:
    __slots__ = ("op", "sender_mac", "sender_ip", "target_mac", "target_ip")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < LEN:
            raise MalformedPacket(f"arp: {len(buf)} bytes is shorter than 28")
        (htype, ptype, hlen, plen, self.op, self.sender_mac, self.sender_ip,
         self.target_mac, self.target_ip) = _ARP.unpack_from(buf)
        if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
            raise MalformedPacket(f"arp: not Ethernet/IPv4 (htype {htype}, ptype {ptype:#x})")


def build(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
          target_ip: bytes) -> bytes:
    return _ARP.pack(1, 0x0800, 6, 4, op, sender_mac, sender_ip, target_mac, target_ip)
