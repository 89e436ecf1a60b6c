"""DHCPv6 client/server messages (RFC 8415 sections 8 and 21).

Theory of operation
-------------------
:class:`Dhcpv6Message` reads the 4-byte header (message type, 24-bit
transaction id) and splits the options into a list of (code, body) pairs,
refusing an option running past the message. Relay messages (RFC 8415 9) are
not parsed: nothing relays on our link. :func:`build` writes a message back
from (code, body) pairs; :func:`encode_domain_list` writes names in the
uncompressed DNS wire form options 24 (and RA's DNSSL) use.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from pyslirp.wire.errors import MalformedPacket

CLIENT_PORT = 546
SERVER_PORT = 547

SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13

OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_ORO = 6
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_INFORMATION_REFRESH_TIME = 32

#: DUID-LL (RFC 8415 11.4) with hardware type 1 (Ethernet).
DUID_LL = 3
HWTYPE_ETHERNET = 1

_OPTION = struct.Struct("!HH")


class Dhcpv6Message:
    """View of a client/server DHCPv6 message (the UDP payload)."""

    __slots__ = ("msg_type", "transaction_id", "options")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < 4:
            raise MalformedPacket(f"dhcpv6: {len(buf)} bytes is shorter than a header")
        self.msg_type = buf[0]
        self.transaction_id = bytes(buf[1:4])
        self.options: list[tuple[int, memoryview]] = []
        i, end = 4, len(buf)
        while i < end:
            if i + 4 > end:
                raise MalformedPacket("dhcpv6: truncated option header")
            code, length = _OPTION.unpack_from(buf, i)
            if i + 4 + length > end:
                raise MalformedPacket(f"dhcpv6: option {code} of {length} bytes runs past "
                                      "the message")
            self.options.append((code, buf[i + 4:i + 4 + length]))
            i += 4 + length

    def option(self, code: int) -> memoryview | None:
        """The body of the first option ``code``, or None."""
        for found, body in self.options:
            if found == code:
                return body
        return None

    def has(self, code: int) -> bool:
        return any(found == code for found, _ in self.options)


def build(msg_type: int, transaction_id: bytes,
          options: Iterable[tuple[int, bytes | memoryview]]) -> bytes:
    parts = [bytes((msg_type,)) + transaction_id]
    for code, body in options:
        parts.append(_OPTION.pack(code, len(body)) + bytes(body))
    return b"".join(parts)


def duid_ll(mac: bytes) -> bytes:
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + mac


def encode_domain_list(names: Iterable[tuple[bytes, ...]]) -> bytes:
    """Names (as label tuples) in uncompressed DNS wire form, one after another."""
    return b"".join(b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
                    for labels in names)
