"""Internet checksum (RFC 1071) in the fastest pure-Python form measured.

Theory of operation
-------------------
The ones' complement sum of 16-bit big-endian words equals the value of the
whole buffer read as one big-endian integer, taken modulo 0xFFFF (because
2**16 == 1 mod 0xFFFF). CPython converts bytes to an int and reduces it by a
small divisor in C, so one ``int.from_bytes(...) % 0xFFFF`` replaces a Python
loop over words (docs/architecture.md: orders of magnitude faster).

The only difference from a folded ones' complement sum is that a sum of
0xFFFF comes out as 0; both encode "zero" in ones' complement, so checksums
computed here verify everywhere. For UDP, where a transmitted 0 means "no
checksum", :func:`finish` maps 0 to 0xFFFF as RFC 768 asks.
"""

from __future__ import annotations

import struct

_PSEUDO4 = struct.Struct("!4s4sxBH")


def partial_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Ones' complement sum of ``data`` (padded to even length), reduced mod 0xFFFF.

    ``initial`` adds a previously computed partial sum (e.g. a pseudo-header).
    """
    value = int.from_bytes(data, "big") << 8 if len(data) & 1 else int.from_bytes(data, "big")
    return (value + initial) % 0xFFFF


def finish(total: int) -> int:
    """Turn a partial sum into the checksum field value (never 0)."""
    return (~total & 0xFFFF) or 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (field value)."""
    return finish(partial_sum(data, initial))


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv4 pseudo-header (RFC 793 section 3.1, RFC 768).

    Stored as is (not complemented) in the checksum field of a frame sent with
    the vnet NEEDS_CSUM flag: the kernel completes it over the L4 data.
    """
    return int.from_bytes(_PSEUDO4.pack(src, dst, proto, length), "big") % 0xFFFF


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True if ``data`` (including its checksum field) sums to ones' complement zero."""
    return partial_sum(data, initial) == 0
