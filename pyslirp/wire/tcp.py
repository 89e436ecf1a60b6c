"""TCP header (RFC 9293 section 3.1) and the options the stack uses.

Theory of operation
-------------------
:class:`TcpSegment` is a view over the TCP part of an IPv4 packet. Its
constructor reads the fixed 20 bytes with one precompiled ``unpack_from``,
checks the data offset against the buffer, and (only when asked) verifies the
checksum with the IPv4 pseudo-header: frames the kernel handed over with the
virtio-net NEEDS_CSUM/DATA_VALID flags need no verification, and a 64 KB
super-frame costs ~60 us to sum, so the caller decides. ``payload`` is a
slice of the original buffer, never a copy. Options are parsed only on demand
(:meth:`TcpSegment.options`), because only SYNs carry options the stack acts on.

Understood options: End, NOP, MSS (RFC 9293 3.7.1), Window Scale (RFC 7323
2), SACK-permitted and SACK blocks (RFC 2018), Timestamps (RFC 7323 3). Unknown options are
skipped by their length; a malformed option list (length < 2 or running past
the header) raises :class:`MalformedPacket`.

Builders: :func:`build_header` writes a header with ``pack_into`` into a
caller's buffer; :func:`build` returns a complete segment with its checksum
(for control segments off the hot path; the stack's data path builds whole
frames itself); :func:`syn_options` encodes the options of a SYN and
:func:`sack_option` a SACK block list.
Urgent data is parsed but nothing here interprets it.
"""

from __future__ import annotations

import struct

from pyslirp.wire.checksum import finish, partial_sum, pseudo_header_sum
from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 20
MAX_HEADER_LEN = 60
PROTO = 6

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

#: RFC 7323 2.3: a shift above 14 is treated as 14.
MAX_WSCALE = 14
#: Offset of the checksum field inside the TCP header (for vnet csum_offset).
CSUM_OFFSET = 16

_HEADER = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")


class TcpOptions:
    """The options of one segment that the stack understands (None: absent)."""

    __slots__ = ("mss", "wscale", "sack_permitted", "sack", "ts_val", "ts_ecr")

    def __init__(self) -> None:
        self.mss: int | None = None
        self.wscale: int | None = None
        self.sack_permitted = False
        #: SACK blocks (RFC 2018 3) as (left edge, right edge) sequence numbers.
        self.sack: list[tuple[int, int]] = []
        self.ts_val: int | None = None
        self.ts_ecr: int | None = None

    def __repr__(self) -> str:
        return (f"TcpOptions(mss={self.mss}, wscale={self.wscale}, "
                f"sack_permitted={self.sack_permitted}, ts=({self.ts_val}, {self.ts_ecr}))")


def parse_options(buf: bytes | bytearray | memoryview) -> TcpOptions:
    """Parse an option list (the bytes between the fixed header and the data)."""
    opts = TcpOptions()
    i = 0
    n = len(buf)
    while i < n:
        kind = buf[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise MalformedPacket(f"tcp: option {kind} has no length byte")
        length = buf[i + 1]
        if length < 2 or i + length > n:
            raise MalformedPacket(f"tcp: option {kind} has bad length {length}")
        # Options with an unexpected length are ignored, as Linux does.
        if kind == OPT_MSS and length == 4:
            opts.mss = _U16.unpack_from(buf, i + 2)[0]
        elif kind == OPT_WSCALE and length == 3:
            opts.wscale = min(buf[i + 2], MAX_WSCALE)
        elif kind == OPT_SACK_PERM and length == 2:
            opts.sack_permitted = True
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            opts.sack = [_U32X2.unpack_from(buf, j) for j in range(i + 2, i + length, 8)]
        elif kind == OPT_TIMESTAMP and length == 10:
            opts.ts_val, opts.ts_ecr = _U32X2.unpack_from(buf, i + 2)
        i += length
    return opts


class TcpSegment:
    """View of a TCP segment. ``payload`` is a slice of the buffer, not a copy.

    ``src_ip``/``dst_ip`` are needed only to verify the checksum.
    """

    __slots__ = ("buf", "src_port", "dst_port", "seq", "ack", "header_len", "flags", "window",
                 "csum", "urgent")

    def __init__(self, buf: memoryview, src_ip: bytes = b"", dst_ip: bytes = b"",
                 verify_checksum: bool = False) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"tcp: {len(buf)} bytes is shorter than a header")
        (self.src_port, self.dst_port, self.seq, self.ack, off, self.flags, self.window,
         self.csum, self.urgent) = _HEADER.unpack_from(buf)
        hl = (off >> 4) << 2
        if hl < HEADER_LEN or hl > len(buf):
            raise MalformedPacket(f"tcp: data offset {hl} outside 20..{len(buf)}")
        self.header_len = hl
        self.buf = buf
        if verify_checksum and partial_sum(
                buf, pseudo_header_sum(src_ip, dst_ip, PROTO, len(buf))) != 0:
            raise MalformedPacket("tcp: bad checksum")

    @property
    def payload(self) -> memoryview:
        return self.buf[self.header_len:]

    @property
    def payload_len(self) -> int:
        return len(self.buf) - self.header_len

    @property
    def seq_len(self) -> int:
        """Sequence space the segment occupies (data plus SYN and FIN)."""
        return len(self.buf) - self.header_len + (self.flags & SYN) // SYN + (self.flags & FIN)

    def options(self) -> TcpOptions:
        # Indexing bytes is twice as fast as indexing a memoryview.
        return parse_options(bytes(self.buf[HEADER_LEN:self.header_len]))

    def __repr__(self) -> str:
        names = "".join(c for bit, c in ((FIN, "F"), (SYN, "S"), (RST, "R"), (PSH, "P"),
                                         (ACK, "A"), (URG, "U")) if self.flags & bit)
        return (f"TcpSegment({self.src_port}->{self.dst_port} [{names}] seq={self.seq} "
                f"ack={self.ack} win={self.window} len={self.payload_len})")


def syn_options(mss: int | None = None, wscale: int | None = None,
                sack_permitted: bool = False,
                timestamps: tuple[int, int] | None = None) -> bytes:
    """Encode SYN options, padded to a multiple of 4 with NOPs (Linux's layout)."""
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if sack_permitted and timestamps is not None:
        out += struct.pack("!BBBBII", OPT_SACK_PERM, 2, OPT_TIMESTAMP, 10, *timestamps)
    else:
        if timestamps is not None:
            out += struct.pack("!BBBBII", OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, *timestamps)
        if sack_permitted:
            out += struct.pack("!BBBB", OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2)
    if wscale is not None:
        out += struct.pack("!BBBB", OPT_NOP, OPT_WSCALE, 3, wscale)
    return bytes(out)


def sack_option(blocks: list[tuple[int, int]]) -> bytes:
    """A SACK option (NOP-padded) with at most 4 blocks; b"" when there are none."""
    blocks = blocks[:4]
    if not blocks:
        return b""
    out = bytearray((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))
    for left, right in blocks:
        out += _U32X2.pack(left & 0xFFFFFFFF, right & 0xFFFFFFFF)
    return bytes(out)


def build_header(buf: bytearray | memoryview, offset: int, src_port: int, dst_port: int,
                 seq: int, ack: int, flags: int, window: int, options: bytes = b"",
                 csum: int = 0, urgent: int = 0) -> int:
    """Write a TCP header (with ``options``, length a multiple of 4) at ``offset``.

    Returns the header length.
    """
    if len(options) & 3 or len(options) > MAX_HEADER_LEN - HEADER_LEN:
        raise ValueError(f"tcp options of {len(options)} bytes: need a multiple of 4, <= 40")
    hl = HEADER_LEN + len(options)
    _HEADER.pack_into(buf, offset, src_port, dst_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      hl << 2, flags, window, csum, urgent)
    if options:
        buf[offset + HEADER_LEN:offset + hl] = options
    return hl


def segment_checksum(src_ip: bytes, dst_ip: bytes,
                     segment: bytes | bytearray | memoryview) -> int:
    """The checksum field value for ``segment`` (its own checksum field must be 0)."""
    return finish(partial_sum(segment, pseudo_header_sum(src_ip, dst_ip, PROTO, len(segment))))


def build(src_ip: bytes, dst_ip: bytes, src_port: int, dst_port: int, seq: int, ack: int,
          flags: int, window: int, payload: bytes | bytearray | memoryview = b"",
          options: bytes = b"") -> bytearray:
    """A complete TCP segment with its checksum (control segments, tests)."""
    hl = HEADER_LEN + len(options)
    out = bytearray(hl + len(payload))
    build_header(out, 0, src_port, dst_port, seq, ack, flags, window, options)
    out[hl:] = payload
    csum = segment_checksum(src_ip, dst_ip, out)
    out[16] = csum >> 8
    out[17] = csum & 0xFF
    return out
