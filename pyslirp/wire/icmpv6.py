"""ICMPv6 (RFC 4443) and the Neighbor Discovery messages and options (RFC 4861, RFC 8106).

Theory of operation
-------------------
:class:`Icmpv6Message` checks the length and the checksum (over the IPv6
pseudo-header, RFC 4443 2.3) once; ``type``/``code`` and, for echo,
``ident``/``seq`` are read from the fixed part. :func:`parse_nd_options`
splits the options of a Neighbor Discovery message into (type, body) pairs and
refuses a zero-length option or one running past the message (RFC 4861 4.6
and 7.1.1: such a message must be silently discarded).

Builders return complete messages with their checksum: :func:`build` for any
type, and the option builders for what our router advertisements carry
(source link-layer address, prefix information, MTU, RDNSS and DNSSL).
"""

from __future__ import annotations

import struct

from pyslirp.wire.checksum import checksum, partial_sum
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv6 import PROTO_ICMPV6, pseudo_header_sum

HEADER_LEN = 8

DEST_UNREACH = 1
#: Destination unreachable codes (RFC 4443 3.1).
NO_ROUTE = 0
ADMIN_PROHIBITED = 1
ADDR_UNREACH = 3
PORT_UNREACH = 4
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAM_PROBLEM = 4
ECHO_REQUEST = 128
ECHO_REPLY = 129
MLD_QUERY = 130
MLD_REPORT = 131
MLD_DONE = 132
ROUTER_SOLICIT = 133
ROUTER_ADVERT = 134
NEIGHBOR_SOLICIT = 135
NEIGHBOR_ADVERT = 136
REDIRECT = 137
MLD2_REPORT = 143

# Neighbor Discovery option types (RFC 4861 4.6, RFC 8106 5).
OPT_SOURCE_LLADDR = 1
OPT_TARGET_LLADDR = 2
OPT_PREFIX_INFO = 3
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

# Router Advertisement flags (RFC 4861 4.2): "other configuration" by DHCPv6.
RA_FLAG_OTHER = 0x40
# Prefix information flags (RFC 4861 4.6.2).
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40
# Neighbor Advertisement flags (RFC 4861 4.4), in the first byte after the checksum.
NA_ROUTER = 0x80
NA_SOLICITED = 0x40
NA_OVERRIDE = 0x20

#: Bytes before the options in RS (4 reserved), RA (12), NS and NA (4 + target 16).
RS_FIXED_LEN = 8
RA_FIXED_LEN = 16
NS_FIXED_LEN = 24
NA_FIXED_LEN = 24

_HEADER = struct.Struct("!BBHHH")
_RA = struct.Struct("!BBHBBHII")
_PREFIX = struct.Struct("!BBBBIII16s")
_MTU = struct.Struct("!BBHI")
_OPT_HEAD = struct.Struct("!BBHI")


class Icmpv6Message:
    """View of an ICMPv6 message, its checksum verified against ``src``/``dst``."""

    __slots__ = ("buf", "type", "code", "ident", "seq")

    def __init__(self, buf: memoryview, src: bytes, dst: bytes,
                 verify_checksum: bool = True) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"icmpv6: {len(buf)} bytes is shorter than a header")
        self.type, self.code, _csum, self.ident, self.seq = _HEADER.unpack_from(buf)
        if verify_checksum and partial_sum(
                buf, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(buf))) != 0:
            raise MalformedPacket("icmpv6: bad checksum")
        self.buf = buf

    @property
    def payload(self) -> memoryview:
        """What follows the 4 bytes of type, code and checksum (echo: ident, seq, data)."""
        return self.buf[4:]


def parse_nd_options(options: memoryview) -> list[tuple[int, memoryview]]:
    """(type, body) of each Neighbor Discovery option; body excludes type and length."""
    found = []
    i = 0
    end = len(options)
    while i < end:
        if i + 2 > end:
            raise MalformedPacket("icmpv6: truncated neighbor discovery option")
        kind, units = options[i], options[i + 1]
        if units == 0:
            raise MalformedPacket(f"icmpv6: neighbor discovery option {kind} of length 0")
        length = units * 8
        if i + length > end:
            raise MalformedPacket(f"icmpv6: neighbor discovery option {kind} of {length} "
                                  "bytes runs past the message")
        found.append((kind, options[i + 2:i + length]))
        i += length
    return found


def build(icmp_type: int, code: int, body: bytes | bytearray | memoryview, src: bytes,
          dst: bytes) -> bytearray:
    """A complete ICMPv6 message: type, code, checksum, then ``body``."""
    out = bytearray(4 + len(body))
    out[0] = icmp_type
    out[1] = code
    out[4:] = body
    csum = checksum(out, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(out)))
    out[2] = csum >> 8
    out[3] = csum & 0xFF
    return out


def ra_body(hop_limit: int, flags: int, router_lifetime: int, options: bytes) -> bytes:
    """The part of a Router Advertisement after the checksum (reachable/retrans timers 0)."""
    return _RA.pack(0, 0, 0, hop_limit, flags, router_lifetime, 0, 0)[4:] + options


def lladdr_option(kind: int, mac: bytes) -> bytes:
    """Source or target link-layer address option (8 bytes for Ethernet)."""
    return bytes((kind, 1)) + mac


def prefix_option(prefix: bytes, length: int, flags: int, valid: int, preferred: int) -> bytes:
    return _PREFIX.pack(OPT_PREFIX_INFO, 4, length, flags, valid, preferred, 0, prefix)


def mtu_option(mtu: int) -> bytes:
    return _MTU.pack(OPT_MTU, 1, 0, mtu)


def rdnss_option(lifetime: int, servers: list[bytes]) -> bytes:
    """Recursive DNS Server option (RFC 8106 5.1)."""
    return _OPT_HEAD.pack(OPT_RDNSS, 1 + 2 * len(servers), 0, lifetime) + b"".join(servers)


def dnssl_option(lifetime: int, encoded_names: bytes) -> bytes:
    """DNS Search List option (RFC 8106 5.2); names in DNS wire form, zero-padded to 8."""
    body = encoded_names + bytes(-len(encoded_names) % 8)
    return _OPT_HEAD.pack(OPT_DNSSL, 1 + len(body) // 8, 0, lifetime) + body
