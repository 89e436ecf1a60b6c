"""DNS messages (RFC 1035 4.1), just enough for a forwarder.

Theory of operation
-------------------
The forwarder passes queries and answers through untouched; it only needs to
know whether a datagram is a query it can forward, whether an upstream reply
belongs to it and what its RCODE is, and to make error replies itself.

:class:`DnsMessage` reads the 12-byte header (ID, flags, counts). Its
:meth:`DnsMessage.question` parses the first question (name, type, class).
:func:`read_name` decodes a (possibly compressed) domain name defensively:
a compression pointer must point strictly before the position where the
pointer's name started (so no loop and no forward reference can exist),
labels are at most 63 bytes, names at most 255 bytes in wire form, and the
reserved label types 0x40/0x80 are rejected. Every violation raises
:class:`~pyslirp.wire.errors.MalformedPacket`.

:func:`build_error_reply` answers a query with an RCODE (SERVFAIL, FORMERR,
NOTIMP, ...) and :func:`build_truncated` turns an over-long reply into its
header and question with TC set, so that the client retries over TCP
(RFC 1035 4.2.1, RFC 7766 5). Neither copies EDNS records (RFC 6891 7 lets an
error reply omit OPT); the answer, authority and additional sections are not
parsed at all.
"""

from __future__ import annotations

import struct

from pyslirp.wire.errors import MalformedPacket

PORT = 53
HEADER_LEN = 12
MAX_NAME_LEN = 255

# Flags (RFC 1035 4.1.1)
FLAG_QR = 0x8000
OPCODE_MASK = 0x7800
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
RCODE_MASK = 0x000F

OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

_HEADER = struct.Struct("!HHHHHH")
_TYPE_CLASS = struct.Struct("!HH")
#: At most this many pointers in one name; a name of 255 bytes has at most
#: 127 labels, so any well-formed name needs fewer.
_MAX_POINTERS = 127


def read_name(buf: bytes | bytearray | memoryview, offset: int) -> tuple[str, int]:
    """Decode the domain name at ``offset``; return it (dotted, as sent) and the offset after it.

    Labels are decoded as ASCII with non-printable bytes escaped as ``\\DDD``
    (RFC 4343 keeps case, so it is kept here too). The root name is ``"."``.
    """
    labels: list[str] = []
    wire_len = 1
    pos = offset
    end_offset = -1
    limit = offset  # a pointer must point below this
    pointers = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise MalformedPacket("dns: name runs past the end of the message")
        length = buf[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= n:
                raise MalformedPacket("dns: truncated compression pointer")
            target = ((length & 0x3F) << 8) | buf[pos + 1]
            if end_offset < 0:
                end_offset = pos + 2
            pointers += 1
            if target >= limit or pointers > _MAX_POINTERS:
                raise MalformedPacket("dns: compression pointer loop or forward reference")
            pos = limit = target
            continue
        if kind:
            raise MalformedPacket(f"dns: reserved label type 0x{kind:02x}")
        if length == 0:
            break
        if pos + 1 + length > n:
            raise MalformedPacket("dns: label runs past the end of the message")
        wire_len += length + 1
        if wire_len > MAX_NAME_LEN:
            raise MalformedPacket("dns: name longer than 255 bytes")
        raw = bytes(buf[pos + 1:pos + 1 + length])
        labels.append("".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C)
                              else f"\\{b:03d}" for b in raw))
        pos += 1 + length
    if end_offset < 0:
        end_offset = pos + 1
    return (".".join(labels) if labels else "."), end_offset


class Question:
    __slots__ = ("name", "qtype", "qclass", "end")

    def __init__(self, name: str, qtype: int, qclass: int, end: int) -> None:
        self.name = name
        self.qtype = qtype
        self.qclass = qclass
        #: Offset just past the question in the message.
        self.end = end

    def key(self) -> tuple[str, int, int]:
        """What identifies the question; names compare case-insensitively (RFC 4343)."""
        return self.name.lower(), self.qtype, self.qclass

    def __repr__(self) -> str:
        return f"Question({self.name!r}, type={self.qtype}, class={self.qclass})"


class DnsMessage:
    """View of a DNS message header; the body is parsed only on request."""

    __slots__ = ("buf", "id", "flags", "qdcount", "ancount", "nscount", "arcount")

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"dns: {len(buf)} bytes is shorter than a header")
        self.buf = buf
        (self.id, self.flags, self.qdcount, self.ancount, self.nscount,
         self.arcount) = _HEADER.unpack_from(buf)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def rcode(self) -> int:
        return self.flags & RCODE_MASK

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    def question(self) -> Question | None:
        """The first question, or None if there is none; raises MalformedPacket if unreadable."""
        if self.qdcount == 0:
            return None
        name, pos = read_name(self.buf, HEADER_LEN)
        if pos + 4 > len(self.buf):
            raise MalformedPacket("dns: question runs past the end of the message")
        qtype, qclass = _TYPE_CLASS.unpack_from(self.buf, pos)
        return Question(name, qtype, qclass, pos + 4)


def _reply_header(query: DnsMessage, rcode: int, qdcount: int, extra_flags: int = 0) -> bytes:
    flags = (FLAG_QR | (query.flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | extra_flags
             | (rcode & RCODE_MASK))
    return _HEADER.pack(query.id, flags, qdcount, 0, 0, 0)


def build_error_reply(query: bytes | bytearray | memoryview, rcode: int) -> bytes:
    """A reply to ``query`` carrying ``rcode`` and, when readable, the query's question.

    ``query`` must have a readable header (>= 12 bytes): raises MalformedPacket otherwise.
    """
    msg = DnsMessage(query)
    try:
        q = msg.question()
    except MalformedPacket:
        q = None
    if q is None:
        return _reply_header(msg, rcode, 0)
    return _reply_header(msg, rcode, 1) + bytes(msg.buf[HEADER_LEN:q.end])


def build_truncated(reply: bytes | bytearray | memoryview) -> bytes:
    """``reply`` cut to its header and first question with TC set (the client retries over TCP)."""
    msg = DnsMessage(reply)
    try:
        q = msg.question()
    except MalformedPacket:
        q = None
    flags = msg.flags | FLAG_TC
    if q is None:
        return _HEADER.pack(msg.id, flags, 0, 0, 0, 0)
    return _HEADER.pack(msg.id, flags, 1, 0, 0, 0) + bytes(msg.buf[HEADER_LEN:q.end])
