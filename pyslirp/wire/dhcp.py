"""BOOTP/DHCP messages (RFC 2131, RFC 951) and their options (RFC 2132).

Theory of operation
-------------------
:class:`DhcpMessage` is a view of a BOOTP message carried in a UDP datagram:
the 236-byte fixed part is unpacked once, the magic cookie is checked, and
the options are decoded into a dict ``{code: value}``. Everything a server
needs is validated up front, so a caller catches a single
:class:`~pyslirp.wire.errors.MalformedPacket`:

* an option whose length runs past the end of the message is an error
  (``truncated option``), and so is a missing cookie or a short message;
* an option that appears more than once is concatenated, as RFC 3396 section 7
  asks (long options, e.g. a domain search list, are split that way);
* option 52 (overload, RFC 2132 9.3) is honoured: the ``file`` and/or
  ``sname`` fields are then decoded as further options, in that order;
* options after END are ignored, padding (0) is skipped anywhere.

:func:`build` writes a message from its fields and an ordered list of
options; an option value longer than 255 bytes is split into consecutive
instances (RFC 3396), and the message is padded to the 300 bytes BOOTP
relays and old clients expect (RFC 1542 2.1). :func:`encode_domain_search`
produces the value of option 119 (RFC 3397): the names in DNS wire form with
RFC 1035 4.1.4 compression applied across the whole list.

Not done here: any policy (which address, which options; see
``pyslirp.stack.dhcp``), relay agent options, option 82, DHCPv6.
"""

from __future__ import annotations

import struct

from pyslirp.wire.errors import MalformedPacket

SERVER_PORT = 67
CLIENT_PORT = 68

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1

#: Fixed BOOTP part (op .. file), RFC 2131 figure 1.
FIXED_LEN = 236
MAGIC_COOKIE = b"\x63\x82\x53\x63"
OPTIONS_OFFSET = FIXED_LEN + 4
#: RFC 1542 2.1: a BOOTP message is at least 300 bytes (relays drop shorter).
MIN_MESSAGE_LEN = 300
#: RFC 2131 2: every client must accept 576-byte IP datagrams (548 bytes of DHCP).
DEFAULT_MAX_MESSAGE_LEN = 576 - 20 - 8

FLAG_BROADCAST = 0x8000
#: An option's value in one instance (its length is one byte); longer is RFC 3396's.
MAX_OPTION_LEN = 255

# Message types (option 53), RFC 2132 9.6
DISCOVER = 1
OFFER = 2
REQUEST = 3
DECLINE = 4
ACK = 5
NAK = 6
RELEASE = 7
INFORM = 8

# Option codes, RFC 2132 (and RFC 3397 for 119)
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_MESSAGE_SIZE = 57
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
_SNAME_OFFSET = 44
_FILE_OFFSET = 108


def _parse_options(buf: memoryview, start: int, end: int, into: dict[int, list[bytes]]) -> None:
    """Append each option's value to ``into[code]`` (joined later: RFC 3396 concatenation
    by ``+`` would copy a long option's bytes once per instance, quadratic in its size)."""
    i = start
    while i < end:
        code = buf[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return
        if i + 1 >= end:
            raise MalformedPacket(f"dhcp: option {code} has no length byte")
        length = buf[i + 1]
        if i + 2 + length > end:
            raise MalformedPacket(f"dhcp: truncated option {code} ({length} bytes)")
        value = bytes(buf[i + 2:i + 2 + length])
        parts = into.get(code)
        if parts is None:
            into[code] = [value]
        else:
            parts.append(value)
        i += 2 + length


class DhcpMessage:
    """View of a BOOTP/DHCP message (the UDP payload).

    Addresses are 4-byte ``bytes``; ``chaddr`` is cut to ``hlen`` bytes (at
    most 16); ``options`` maps option codes to their (concatenated) values.
    """

    __slots__ = ("op", "htype", "hlen", "hops", "xid", "secs", "flags", "ciaddr", "yiaddr",
                 "siaddr", "giaddr", "chaddr", "options")

    def __init__(self, buf: memoryview | bytes | bytearray) -> None:
        buf = memoryview(buf)
        if len(buf) < OPTIONS_OFFSET:
            raise MalformedPacket(f"dhcp: {len(buf)} bytes is shorter than a DHCP message")
        (self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
         self.ciaddr, self.yiaddr, self.siaddr, self.giaddr, chaddr, _sname,
         _file) = _FIXED.unpack_from(buf)
        if buf[FIXED_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
            raise MalformedPacket("dhcp: no magic cookie (plain BOOTP is not served)")
        if self.hlen > 16:
            raise MalformedPacket(f"dhcp: hardware address length {self.hlen} > 16")
        self.chaddr: bytes = chaddr[: self.hlen]
        parts: dict[int, list[bytes]] = {}
        _parse_options(buf, OPTIONS_OFFSET, len(buf), parts)
        overload_parts = parts.get(OPT_OVERLOAD)
        if overload_parts is not None:
            overload = b"".join(overload_parts)
            if len(overload) != 1 or overload[0] not in (1, 2, 3):
                raise MalformedPacket(f"dhcp: bad overload option {overload!r}")
            if overload[0] & 1:
                _parse_options(buf, _FILE_OFFSET, _FILE_OFFSET + 128, parts)
            if overload[0] & 2:
                _parse_options(buf, _SNAME_OFFSET, _SNAME_OFFSET + 64, parts)
        self.options: dict[int, bytes] = {
            code: values[0] if len(values) == 1 else b"".join(values)
            for code, values in parts.items()}

    @property
    def msg_type(self) -> int | None:
        """Option 53, or None for a message without one (plain BOOTP) or a bad one."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value is not None and len(value) == 1 else None

    def _addr_option(self, code: int) -> bytes | None:
        value = self.options.get(code)
        return value if value is not None and len(value) == 4 else None

    @property
    def requested_ip(self) -> bytes | None:
        return self._addr_option(OPT_REQUESTED_IP)

    @property
    def server_id(self) -> bytes | None:
        return self._addr_option(OPT_SERVER_ID)

    @property
    def client_id(self) -> bytes | None:
        return self.options.get(OPT_CLIENT_ID)

    @property
    def param_request_list(self) -> bytes:
        return self.options.get(OPT_PARAM_REQUEST, b"")

    @property
    def max_message_size(self) -> int:
        """The DHCP payload size the client accepts (option 57 counts IP+UDP too)."""
        value = self.options.get(OPT_MAX_MESSAGE_SIZE)
        if value is None or len(value) != 2:
            return DEFAULT_MAX_MESSAGE_LEN
        # RFC 2132 9.10: the minimum legal value is 576; smaller is ignored.
        return max(int.from_bytes(value, "big"), 576) - 20 - 8

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)


def encode_options(options: list[tuple[int, bytes]]) -> bytearray:
    """Options in wire form followed by END; values over 255 bytes are split (RFC 3396)."""
    out = bytearray()
    for code, value in options:
        if not value:
            out += bytes((code, 0))
            continue
        for i in range(0, len(value), 255):
            chunk = value[i:i + 255]
            out += bytes((code, len(chunk)))
            out += chunk
    out.append(OPT_END)
    return out


def build(op: int, xid: int, chaddr: bytes, options: list[tuple[int, bytes]], *,
          flags: int = 0, ciaddr: bytes = bytes(4), yiaddr: bytes = bytes(4),
          siaddr: bytes = bytes(4), giaddr: bytes = bytes(4), secs: int = 0,
          htype: int = HTYPE_ETHERNET, hops: int = 0) -> bytearray:
    """A DHCP message (UDP payload) with ``options`` in the given order."""
    opts = encode_options(options)
    out = bytearray(max(OPTIONS_OFFSET + len(opts), MIN_MESSAGE_LEN))
    _FIXED.pack_into(out, 0, op, htype, len(chaddr), hops, xid, secs, flags, ciaddr, yiaddr,
                     siaddr, giaddr, chaddr, b"", b"")
    out[FIXED_LEN:OPTIONS_OFFSET] = MAGIC_COOKIE
    out[OPTIONS_OFFSET:OPTIONS_OFFSET + len(opts)] = opts
    return out


def domain_labels(domain: str) -> tuple[bytes, ...]:
    """The labels of ``domain`` (a trailing dot allowed) as they go on the wire.

    Non-ASCII labels are IDNA-encoded (RFC 3490). Raises ValueError, saying
    why, for a name that cannot be a DNS name: an empty label, a label over 63
    bytes, a name over 255 bytes in wire form, a label IDNA rejects.
    """
    text = domain.rstrip(".")
    if not text:
        return ()
    labels = []
    for label in text.split("."):
        if label.isascii():
            raw = label.encode()
        else:
            try:
                raw = label.encode("idna")
            except UnicodeError as exc:
                reason = exc.__cause__ or exc
                raise ValueError(f"label {label!r} is not a valid internationalised "
                                 f"name ({reason})") from None
        if not 1 <= len(raw) <= 63:
            raise ValueError(f"label {label!r} is {len(raw)} bytes long (1..63 allowed)")
        labels.append(raw)
    if sum(len(label) + 1 for label in labels) + 1 > 255:
        raise ValueError("the name is longer than 255 bytes")
    return tuple(labels)


def encode_domain_search(domains: list[str]) -> bytes:
    """Option 119 value: ``domains`` as DNS names with RFC 1035 compression (RFC 3397).

    Raises ValueError for a name that is not a valid DNS name (see
    :func:`domain_labels`).
    """
    out = bytearray()
    suffixes: dict[tuple[bytes, ...], int] = {}
    for domain in domains:
        try:
            labels = domain_labels(domain)
        except ValueError as exc:
            raise ValueError(f"invalid domain name {domain!r}: {exc}") from None
        for i in range(len(labels)):
            suffix = labels[i:]
            offset = suffixes.get(tuple(label.lower() for label in suffix))
            if offset is not None:
                out += struct.pack("!H", 0xC000 | offset)
                break
            if len(out) < 0x3FFF:
                suffixes[tuple(label.lower() for label in suffix)] = len(out)
            out.append(len(labels[i]))
            out += labels[i]
        else:
            out.append(0)
    return bytes(out)
