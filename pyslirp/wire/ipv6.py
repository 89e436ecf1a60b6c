"""IPv6 header and extension header chain (RFC 8200), addresses (RFC 4291).

Theory of operation
-------------------
:class:`Ipv6Packet` validates once what every consumer relies on: version 6,
a payload length within the buffer (trailing Ethernet padding is cut off),
and an extension header chain that ends, inside the packet, at an upper-layer
header. It then exposes ``proto`` (the upper-layer protocol) and ``payload``
(from the upper-layer header to the end of the packet).

The chain walk (RFC 8200 section 4) accepts, in any order but with Hop-by-Hop
only first, at most :data:`MAX_EXTENSION_HEADERS` of: Hop-by-Hop and
Destination Options (their options are walked: Pad1, PadN and Router Alert are
known; an unknown option whose two high type bits ask for anything but "skip"
makes the packet malformed, as RFC 8200 4.2 says for the final destination,
which we are), Routing (only with Segments Left 0: we forward no source
routes), and Authentication (skipped). A Fragment header (44) ends the walk:
``proto`` is then 44 and ``upper_offset`` is where the Fragment header starts,
so everything before it is the unfragmentable part (RFC 8200 4.5);
:func:`fragment_header` reads it and :mod:`pyslirp.stack.frag` reassembles.
ESP (50) and No Next Header (59) end the walk as well.

Jumbograms (RFC 2675) are refused: a zero payload length is only accepted
with No Next Header (an empty packet), so a Jumbo Payload option never gets
to claim a length of its own. Every malformed packet raises
:class:`MalformedPacket` with an ``ipv6:`` prefix.

:func:`build_header` writes the fixed 40-byte header; :func:`pseudo_header_sum`
is the partial sum of the upper-layer pseudo-header (RFC 8200 8.1) for the
checksums of ICMPv6, UDP and TCP. Addresses are 16-byte ``bytes``.
"""

from __future__ import annotations

import socket
import struct

from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 40
#: The smallest MTU an IPv6 link may have (RFC 8200 section 5).
MIN_MTU = 1280

PROTO_HOPOPTS = 0
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60

#: Longer chains are refused: no legitimate packet to us needs more, and the walk is bounded.
MAX_EXTENSION_HEADERS = 8

UNSPECIFIED = bytes(16)
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
#: DHCPv6 All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1).
ALL_DHCP_AGENTS = bytes.fromhex("ff020000000000000000000000010002")
_SOLICITED_NODE_PREFIX = bytes.fromhex("ff0200000000000000000001ff")
_LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")

_FIXED = struct.Struct("!IHBB16s16s")
_PSEUDO = struct.Struct("!16s16sI3xB")

# Hop-by-Hop / Destination option types that need no action from a final destination.
_OPT_PAD1 = 0
_OPT_PADN = 1
_OPT_ROUTER_ALERT = 5


class Ipv6Packet:
    """View of an IPv6 packet: ``proto``/``payload`` are the upper layer, past any extensions."""

    __slots__ = ("buf", "traffic_class", "payload_len", "next_header", "hop_limit", "src",
                 "dst", "proto", "upper_offset")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"ipv6: {len(buf)} bytes is shorter than a header")
        (ver_tc_flow, self.payload_len, self.next_header, self.hop_limit, self.src,
         self.dst) = _FIXED.unpack_from(buf)
        if ver_tc_flow >> 28 != 6:
            raise MalformedPacket(f"ipv6: version {ver_tc_flow >> 28}")
        self.traffic_class = (ver_tc_flow >> 20) & 0xFF
        total = HEADER_LEN + self.payload_len
        if total > len(buf):
            raise MalformedPacket(f"ipv6: payload length {self.payload_len} exceeds the "
                                  f"{len(buf) - HEADER_LEN} bytes present")
        if self.payload_len == 0 and self.next_header != PROTO_NONE:
            raise MalformedPacket("ipv6: payload length 0 (a jumbogram?) is not supported")
        self.buf = buf[:total] if total != len(buf) else buf
        self.proto, self.upper_offset = _walk_extensions(self.buf, self.next_header)

    @property
    def payload(self) -> memoryview:
        """The upper-layer header and data (after every extension header)."""
        return self.buf[self.upper_offset:]


def _walk_extensions(buf: memoryview, next_header: int,
                     offset: int = HEADER_LEN) -> tuple[int, int]:
    """(upper-layer protocol, its offset) after the extension headers; see the module doc."""
    end = len(buf)
    for count in range(MAX_EXTENSION_HEADERS + 1):
        if next_header not in (PROTO_HOPOPTS, PROTO_DSTOPTS, PROTO_ROUTING, PROTO_AH):
            return next_header, offset
        if count == MAX_EXTENSION_HEADERS:
            break
        if next_header == PROTO_HOPOPTS and offset != HEADER_LEN:
            raise MalformedPacket("ipv6: hop-by-hop options header not first")
        if offset + 8 > end:
            raise MalformedPacket(f"ipv6: extension header {next_header} truncated")
        # AH counts 4-byte units less 2 (RFC 4302 2.2), the others 8-byte units less 1.
        units = buf[offset + 1]
        length = (units + 2) * 4 if next_header == PROTO_AH else (units + 1) * 8
        if offset + length > end:
            raise MalformedPacket(f"ipv6: extension header {next_header} of {length} bytes "
                                  "runs past the packet")
        if next_header in (PROTO_HOPOPTS, PROTO_DSTOPTS):
            _check_options(buf[offset + 2:offset + length])
        elif next_header == PROTO_ROUTING and buf[offset + 3] != 0:
            raise MalformedPacket("ipv6: routing header with segments left (not forwarded)")
        next_header = buf[offset]
        offset += length
    raise MalformedPacket(f"ipv6: more than {MAX_EXTENSION_HEADERS} extension headers")


def _check_options(options: memoryview) -> None:
    """Walk Hop-by-Hop/Destination options; refuse one a final destination must not skip."""
    i = 0
    end = len(options)
    while i < end:
        kind = options[i]
        if kind == _OPT_PAD1:
            i += 1
            continue
        if i + 2 > end or i + 2 + options[i + 1] > end:
            raise MalformedPacket(f"ipv6: option {kind} runs past its header")
        if kind not in (_OPT_PADN, _OPT_ROUTER_ALERT) and kind >> 6 != 0:
            raise MalformedPacket(f"ipv6: unknown option 0x{kind:02x} must not be skipped")
        i += 2 + options[i + 1]


FRAGMENT_HEADER_LEN = 8
_FRAGMENT = struct.Struct("!BxHI")


def fragment_header(packet: Ipv6Packet) -> tuple[int, int, bool, int]:
    """(next header, offset in bytes, more fragments, identification) of the Fragment
    header (RFC 8200 4.5) at which ``packet``'s walk stopped (``proto`` 44)."""
    offset = packet.upper_offset
    if offset + FRAGMENT_HEADER_LEN > len(packet.buf):
        raise MalformedPacket("ipv6: fragment header truncated")
    next_header, field, ident = _FRAGMENT.unpack_from(packet.buf, offset)
    return next_header, field & 0xFFF8, bool(field & 1), ident


#: The fixed part of the upper-layer headers a first fragment must hold whole (RFC 8200 4.5).
_UPPER_HEADER_LEN = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMPV6: 4}


def check_first_fragment(next_header: int, data: memoryview) -> None:
    """Refuse a first fragment whose data does not hold every header through the
    upper-layer one (RFC 8200 4.5, RFC 7112): such a fragment "should be discarded",
    and no honest sender splits the header chain."""
    proto, offset = _walk_extensions(data, next_header, 0)
    if offset + _UPPER_HEADER_LEN.get(proto, 0) > len(data):
        raise MalformedPacket("ipv6: first fragment does not hold the upper-layer header")


def build_fragment_header(next_header: int, offset: int, more: bool, ident: int) -> bytes:
    return _FRAGMENT.pack(next_header, offset | more, ident)


def next_header_offset(unfragmentable: bytes | bytearray | memoryview) -> int:
    """Where the last Next Header field of an (already validated) header chain is: the
    byte a reassembled packet sets to the fragments' upper-layer protocol."""
    where = 6
    offset = HEADER_LEN
    while offset < len(unfragmentable):
        kind = unfragmentable[where]  # the type of the header at offset
        where = offset
        units = unfragmentable[offset + 1]
        offset += (units + 2) * 4 if kind == PROTO_AH else (units + 1) * 8
    return where


def build_header(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                 next_header: int, payload_len: int, hop_limit: int = 64) -> None:
    """Write the 40-byte IPv6 header at ``offset`` (traffic class and flow label 0)."""
    _FIXED.pack_into(buf, offset, 6 << 28, payload_len, next_header, hop_limit, src, dst)


def header(src: bytes, dst: bytes, next_header: int, payload_len: int,
           hop_limit: int = 64) -> bytes:
    return _FIXED.pack(6 << 28, payload_len, next_header, hop_limit, src, dst)


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the upper-layer pseudo-header (RFC 8200 section 8.1)."""
    return int.from_bytes(_PSEUDO.pack(src, dst, length, proto), "big") % 0xFFFF


def is_multicast(addr: bytes) -> bool:
    return addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    """fe80::/10 (RFC 4291 2.5.6)."""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def solicited_node(addr: bytes) -> bytes:
    """The solicited-node multicast address of ``addr`` (RFC 4291 2.7.1)."""
    return _SOLICITED_NODE_PREFIX + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet address a multicast ``addr`` goes to (RFC 2464 section 7)."""
    return b"\x33\x33" + addr[12:]


def interface_id(mac: bytes) -> bytes:
    """The modified EUI-64 interface identifier of a MAC address (RFC 4291 appendix A)."""
    return bytes((mac[0] ^ 0x02,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]


def link_local(mac: bytes) -> bytes:
    """fe80::/64 with the EUI-64 interface identifier of ``mac`` (RFC 4862 5.3)."""
    return _LINK_LOCAL_PREFIX + interface_id(mac)


def addr_to_str(addr: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, addr)


def addr_from_str(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)
