"""slirp4netns's JSON API socket (``--api-socket PATH``), byte for byte.

Theory of operation
-------------------
rootlesskit's and podman's port drivers talk to slirp4netns over a Unix
stream socket, one request per connection: the client writes a JSON object
(maybe followed by a newline, maybe half-closing), slirp4netns answers with
one write and closes. This module speaks that protocol so those clients work
unchanged:

* ``{"execute":"add_hostfwd","arguments":{"proto":"tcp"|"udp","host_addr":A,
  "host_port":P,"guest_addr":G,"guest_port":Q}}`` -> ``{"return":{"id":N}}``;
  ``host_addr`` defaults to ``0.0.0.0``, ``guest_addr`` to the configured
  guest address (network + 100); ids count from 1 and are never reused.
* ``{"execute":"list_hostfwd"}`` -> ``{"entries":[{"id":..,"proto":..,
  "host_addr":..,"host_port":..,"guest_addr":..,"guest_port":..},...]}``.
* ``{"execute":"remove_hostfwd","arguments":{"id":N}}`` -> ``{"return":{}}``.
* Errors are ``{"error":{"desc":"bad request: ..."}}`` with slirp4netns
  1.2.0's texts (api.c): ``cannot parse JSON``, ``json_object() failed``,
  ``no execute found``, ``unknown execute``, ``too large message``,
  ``add_hostfwd: bad arguments.FIELD``, ``add_hostfwd: slirp_add_hostfwd
  failed`` (the port is taken), ``remove_hostfwd: bad arguments.id``.

Extensions (requests slirp4netns refuses, so no client of it depends on their
answers; every request it accepts is answered byte for byte as it does):

* ``{"execute":"get_stats"}`` -> ``{"return":{"counters":{NAME:N,...},
  "flows":{"tcp":N,"tcp_time_wait":N,"udp":N,"icmp":N,"dns":N}}}``: the
  stack's counters and flow gauges now (:mod:`pyslirp.stats`, docs/stats.md);
  slirp4netns answers ``unknown execute``.
* ``add_hostfwd`` with ``host_port`` the number 0 (slirp4netns:
  ``bad arguments.host_port``): the kernel picks a free port, the answer
  says which, ``{"return":{"id":N,"host_port":P}}``, and ``list_hostfwd``
  shows P. Only an explicit number 0 (or ``0.0``, ``-0``) asks for this: a
  missing, non-number or fractional (``0.5``) ``host_port`` is refused as
  before.
* IPv6 addresses in ``add_hostfwd`` (slirp4netns: ``bad arguments.host_addr``
  / ``guest_addr``), with ``-6``: ``host_addr`` ``::``, ``::1`` or any host
  address (read as ``inet_pton(AF_INET6)`` does: no zone, no IPv4-mapped
  address), ``guest_addr`` an IPv6 address in the ``--cidr6`` prefix (not the
  gateway's or the DNS server's) or an IPv4 one; either family with either.
  ``guest_addr`` omitted (or "") with an IPv6 ``host_addr``: IPv6 peers reach
  the guest's IPv6 address as pyslirp knows it at each connection
  (:meth:`pyslirp.runtime.hostfwd.HostForwarder.guest_addr6`), IPv4 peers of
  a dual-stack ``::`` the default IPv4 guest address; ``list_hostfwd`` shows
  the IPv6 address such a forward sends to now ("" while none is known). The
  answers are slirp4netns's (``{"return":{"id":N}}``; entries of the same
  shape, addresses as ``inet_ntop`` writes them); refusals name the field and
  why: ``bad arguments.host_addr: IPv6 is not enabled (--enable-ipv6)``,
  ``bad arguments.guest_addr: fd01::5 is outside the guest's prefix fd00::/64``,
  ``... is pyslirp's own address, not the guest's``, ``... is IPv4-mapped; use
  the IPv4 address``. Text that is no address at all keeps slirp4netns's bare
  ``bad arguments.host_addr``.

slirp4netns reads a request with one ``read`` of at most 4096 bytes into a C
string and parses it with parson; what *that* accepts is what we accept, so
:func:`parse_json` is a small parser with parson's rules rather than Python's
``json`` (they differ on duplicate keys, lone surrogates, ``NaN``, ``1.``,
``0e5``, trailing garbage, a UTF-8 BOM, ...). The rules, all checked against
the real binary (tests/test_api.py keeps the table):

* a NUL byte ends the request (C string); a leading UTF-8 BOM is skipped;
  whitespace is C ``isspace``; anything after the first value is ignored;
* duplicate keys, keys containing ``\\u0000``, control bytes in strings,
  unknown escapes, unpaired surrogates, non-finite numbers, numbers with a
  leading zero (``01``, ``0e5``, ``-00``) or hex fail; invalid UTF-8 passes;
* numbers are what ``strtod`` reads (``1.``, ``-.5``, ``1e-999`` pass) and
  become ports and ids by C's ``(int)`` truncation; a string value is
  compared up to its first ``\\u0000`` (``strcmp``); a field of the wrong
  type is as if absent; nesting deeper than 2048 fails.

Reading: slirp4netns blocks in that one ``read``. We read without blocking
anyone and answer as soon as the bytes so far parse as a complete value, or
cannot become one (a syntax error before their end), or the client
half-closes, or 4096 bytes arrived (``too large message``), or nothing more
came for ``timeout`` seconds (the bytes so far are the request, so a client
that sends nothing gets ``cannot parse JSON``). The parser is fed each read
and goes on where the last one left it (:class:`JsonParser`: the parse steps
are generators that wait at the end of the bytes), never from the start, so
a request dribbled in a byte at a time is parsed once, not once per byte;
after each read it is exactly where a parse of all the bytes so far would
be, so answers are the same as if each read had been parsed from scratch.
Many clients are served
at once; each gets exactly one reply, written with one ``send`` unless the
socket buffer is full, then the connection is shut down and closed.

Deliberate differences from slirp4netns (each would otherwise crash it or do
something nobody asked for):

* a missing or non-string ``proto`` gets ``add_hostfwd: bad arguments.proto``
  (slirp4netns dereferences NULL and dies, taking the network with it);
* ports outside 1..65535 (after truncation) are ``bad arguments.host_port`` /
  ``guest_port``; slirp4netns passes them to ``htons`` and binds whatever
  port the low 16 bits name (``-1`` is 65535, ``65536`` a random port);
* the socket file is created owner-only (0600), an existing *socket* at the
  path is replaced (slirp4netns unlinks whatever is there; we refuse to
  remove anything else), and the file is removed on exit;
* the request is logged at debug level, not always on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyslirp import stats as stats_module
from pyslirp.api_listen import ApiError as ApiError
from pyslirp.api_listen import bind_unix

if TYPE_CHECKING:
    from pyslirp.runtime.spec import ApiFactory

log = logging.getLogger("pyslirp")

#: slirp4netns's read buffer: a read that fills it is "too large message".
MAX_REQUEST = 4096
#: parson's MAX_NESTING.
MAX_NESTING = 2048
#: Seconds a connection may stay silent before what it sent is taken as the request.
DEFAULT_TIMEOUT = 10.0
#: Connections served at once; more wait in the listen backlog.
MAX_CLIENTS = 64

#: How long the listener is left alone after accept failed (out of file descriptors).
_ACCEPT_PAUSE = 0.5

_BOM = b"\xef\xbb\xbf"


def error_reply(desc: str) -> bytes:
    """slirp4netns's error object for ``bad request: DESC``."""
    return b'{"error":{"desc":"bad request: ' + desc.encode() + b'"}}'


CANNOT_PARSE = error_reply("cannot parse JSON")
NOT_OBJECT = error_reply("json_object() failed")
NO_EXECUTE = error_reply("no execute found")
UNKNOWN_EXECUTE = error_reply("unknown execute")
TOO_LARGE = error_reply("too large message")
ADD_FAILED = error_reply("add_hostfwd: slirp_add_hostfwd failed")
REMOVE_FAILED = error_reply("remove_hostfwd: slirp_remove_hostfwd failed")
REMOVE_OK = b'{"return":{}}'


def bad_argument(execute: str, field: str) -> bytes:
    return error_reply(f"{execute}: bad arguments.{field}")


#: Why an IPv6 address is refused without ``--enable-ipv6`` (after ``bad arguments.FIELD``).
_NO_IPV6 = ": IPv6 is not enabled (--enable-ipv6)"


# ---- parson's JSON -------------------------------------------------------------------------

class JsonError(ValueError):
    """The text is not JSON as parson reads it."""


class JsonIncomplete(JsonError):
    """The text ended inside a value: more bytes could still make it valid."""


_WS = frozenset(b" \t\n\v\f\r")
# What strtod reads as a decimal number (the first byte is '-' or a digit).
_NUMBER = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NONFINITE = re.compile(rb"-?(?:inf|nan)", re.IGNORECASE)
_HEX_TAIL = re.compile(rb"[xX](?:[0-9a-fA-F]|\.[0-9a-fA-F])")
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]*')
_HEX4 = re.compile(rb"[0-9a-fA-F]{4}")
_ESCAPES = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
            ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
_LITERALS: dict[int, tuple[bytes, Any]] = {
    ord("t"): (b"true", True), ord("f"): (b"false", False), ord("n"): (b"null", None)}


def _skip_ws(s: bytes, i: int) -> int:
    n = len(s)
    while i < n and s[i] in _WS:
        i += 1
    return i


class _Text:
    """The request text read so far; it grows while a parse waits for more."""

    __slots__ = ("s",)

    def __init__(self, s: bytes = b"") -> None:
        self.s = s


#: A parse step: yields the reason it waits (the text ended inside a value) and
#: re-reads ``_Text.s`` when resumed; returns its result; raises JsonError.
_Step = Generator[str, None, Any]


def _ws(text: _Text, i: int, reason: str) -> Generator[str, None, int]:
    """The index of the first non-whitespace byte at or after ``i``, waiting for one."""
    while True:
        i = _skip_ws(text.s, i)
        if i < len(text.s):
            return i
        yield reason


def _string(text: _Text, i: int) -> Generator[str, None, tuple[bytes, int]]:
    """The string whose opening quote is at ``i``: (its bytes, index after the closing quote)."""
    i += 1
    out = bytearray()
    while True:
        s = text.s
        m = _PLAIN.match(s, i)
        assert m is not None  # the pattern matches the empty string
        out += m.group()
        i = m.end()
        if i >= len(s):
            yield "unterminated string"
            continue
        c = s[i]
        if c == 0x22:  # "
            return bytes(out), i + 1
        if c != 0x5C:  # a control byte
            raise JsonError("control character in string")
        try:
            decoded, end = _escape(s, i)
        except JsonIncomplete as exc:
            yield str(exc)  # read the whole escape again (at most 12 bytes) with more
            continue
        out += decoded
        i = end


def _escape(s: bytes, i: int) -> tuple[bytes, int]:
    """The escape whose backslash is at ``i``: (its UTF-8 bytes, index after it)."""
    if i + 1 >= len(s):
        raise JsonIncomplete("unterminated escape")
    e = s[i + 1]
    if e != 0x75:  # not \u
        simple = _ESCAPES.get(e)
        if simple is None:
            raise JsonError("unknown escape")
        return simple, i + 2
    cp, i = _hex4(s, i + 2)
    if 0xD800 <= cp <= 0xDBFF:
        pair = s[i:i + 2]
        if len(pair) < 2 and b"\\u".startswith(pair):
            raise JsonIncomplete("unterminated surrogate pair")
        if pair != b"\\u":
            raise JsonError("unpaired surrogate")
        low, i = _hex4(s, i + 2)
        if not 0xDC00 <= low <= 0xDFFF:
            raise JsonError("unpaired surrogate")
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
    elif 0xDC00 <= cp <= 0xDFFF:
        raise JsonError("unpaired surrogate")
    return chr(cp).encode("utf-8"), i


def _hex4(s: bytes, i: int) -> tuple[int, int]:
    m = _HEX4.match(s, i)
    if m is None:
        if re.fullmatch(rb"[0-9a-fA-F]{0,3}", s[i:]):
            raise JsonIncomplete("unterminated \\u escape")
        raise JsonError("bad \\u escape")
    return int(m.group(), 16), i + 4


def _number(s: bytes, i: int) -> tuple[float, int]:
    m = _NUMBER.match(s, i)
    if m is None:
        if _NONFINITE.match(s, i):
            raise JsonError("non-finite number")
        # strtod read nothing: parson takes 0 and does not advance.
        return 0.0, i
    text = m.group()
    if text in (b"0", b"-0") and _HEX_TAIL.match(s, m.end()):
        raise JsonError("hexadecimal number")
    # parson's is_decimal: no leading zero unless a fraction follows.
    if len(text) > 1 and text[0] == 0x30 and text[1] != 0x2E:
        raise JsonError("leading zero")
    if len(text) > 2 and text.startswith(b"-0") and text[2] != 0x2E:
        raise JsonError("leading zero")
    value = float(text)
    if math.isinf(value):
        raise JsonError("non-finite number")
    return value, m.end()


def _key(text: _Text, i: int) -> Generator[str, None, tuple[bytes, int]]:
    """An object key at ``i`` (after whitespace), then the ':'; returns index after the ':'."""
    i = yield from _ws(text, i, "object key expected")
    if text.s[i] != 0x22:
        raise JsonError("object key expected")
    key, i = yield from _string(text, i)
    if 0 in key:
        raise JsonError("NUL in key")
    i = yield from _ws(text, i, "':' expected")
    if text.s[i] != 0x3A:
        raise JsonError("':' expected")
    return key, i + 1


def _scalar(text: _Text, i: int, inside: bool) -> Generator[str, None, tuple[Any, int]]:
    """A string, number or literal at ``i``; ``inside`` a container, more must follow it."""
    c = text.s[i]
    if c == 0x22:
        return (yield from _string(text, i))
    if c == 0x2D or 0x30 <= c <= 0x39:
        while True:
            value, end = _number(text.s, i)
            if end < len(text.s) or not inside:
                return value, end
            # More digits may follow: read the number again once they have come.
            yield "',' or end of container expected"
    if c in _LITERALS:
        word, value = _LITERALS[c]
        while not text.s.startswith(word, i):
            if not word.startswith(text.s[i:]):
                raise JsonError("bad literal")
            yield "unterminated literal"
        return value, i + len(word)
    raise JsonError("value expected")


def _document(text: _Text) -> _Step:
    """The first JSON value of the text, parsed the way parson does (see parse_json)."""
    i = 3 if text.s.startswith(_BOM) else 0
    # Open containers: (container, key of the member being parsed, for objects).
    stack: list[tuple[dict[bytes, Any] | list[Any], bytes]] = []
    while True:
        # ---- one value at i
        if len(stack) > MAX_NESTING:
            raise JsonError("nesting too deep")
        i = yield from _ws(text, i, "value expected")
        c = text.s[i]
        value: Any
        if c == 0x7B or c == 0x5B:  # { [
            i = yield from _ws(text, i + 1, "unterminated container")
            if text.s[i] == (0x7D if c == 0x7B else 0x5D):
                value = {} if c == 0x7B else []
                i += 1
            elif c == 0x7B:
                key, i = yield from _key(text, i)
                stack.append(({}, key))
                continue
            else:
                stack.append(([], b""))
                continue
        else:
            value, i = yield from _scalar(text, i, inside=bool(stack))
        # ---- attach it to its container; close every container that ends here
        while True:
            if not stack:
                return value
            container, key = stack[-1]
            if isinstance(container, dict):
                container[key] = value
            else:
                container.append(value)
            i = yield from _ws(text, i, "',' or end of container expected")
            if text.s[i] == 0x2C:  # ,
                if isinstance(container, dict):
                    key, i = yield from _key(text, i + 1)
                    if key in container:
                        # parson fails once the value is parsed too; nothing can save it.
                        raise JsonError("duplicate key")
                    stack[-1] = (container, key)
                else:
                    i += 1
                break
            if text.s[i] != (0x7D if isinstance(container, dict) else 0x5D):
                raise JsonError("',' or end of container expected")
            i += 1
            stack.pop()
            value = container


def parse_json(text: bytes) -> Any:
    """Parse the first JSON value of ``text`` the way parson does (see the module docstring).

    Objects become dicts with ``bytes`` keys, strings ``bytes``, numbers ``float``.
    Raises :class:`JsonIncomplete` if ``text`` ends inside the value and
    :class:`JsonError` if it cannot be JSON. Iterative, so nesting costs no recursion.
    """
    parser = JsonParser()
    if not parser.feed(text):
        raise JsonIncomplete(parser.waiting_for)
    return parser.value


class JsonParser:
    """:func:`parse_json` fed piece by piece: each byte is read about once, not once per piece.

    After every :meth:`feed` the parser is where :func:`parse_json` of all the
    bytes so far would be: done (a value, or :class:`JsonError` raised) or
    waiting. A token that ends exactly where the bytes end, and whose meaning
    more bytes could change (a number inside a container, an escape), is read
    again from its start when they come, as a parse of the longer text would.
    """

    def __init__(self) -> None:
        self._text = _Text()
        self._steps: _Step | None = None
        #: Why more bytes are needed (JsonIncomplete's message) while not done.
        self.waiting_for = "value expected"
        self.done = False
        self.value: Any = None

    def feed(self, data: bytes) -> bool:
        """Add ``data``; True once the value is complete (``value``); JsonError if it can't be."""
        if self.done or not data:
            return self.done
        self._text.s += data
        try:
            if self._steps is None:
                self._steps = _document(self._text)
                self.waiting_for = next(self._steps)
            else:
                self.waiting_for = self._steps.send(None)
        except StopIteration as stop:
            self.done, self.value, self._steps = True, stop.value, None
        except JsonError:
            self._steps = None
            raise
        return self.done


# ---- the requests ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HostFwd:
    """One forwarding rule as ``list_hostfwd`` shows it."""

    id: int
    proto: str
    host_addr: str
    host_port: int
    guest_addr: str
    guest_port: int

    def to_json(self, guest_addr: str | None = None) -> bytes:
        """The entry; ``guest_addr``: shown instead of the stored one (see ApiHandler)."""
        shown = self.guest_addr if guest_addr is None else guest_addr
        return (b'{"id":%d,"proto":"%s","host_addr":"%s","host_port":%d,'
                b'"guest_addr":"%s","guest_port":%d}'
                % (self.id, self.proto.encode(), self.host_addr.encode(), self.host_port,
                   shown.encode(), self.guest_port))


class Forwarder(Protocol):
    """What the API asks of the runtime (pyslirp.runtime.hostfwd.HostForwarder)."""

    def add(self, proto: str, host_addr: str, host_port: int, guest_addr: str,
            guest_port: int) -> int:
        """Start forwarding; raise OSError (e.g. EADDRINUSE) if the host port can't be had.

        Addresses are IPv4 or IPv6 text; ``guest_addr`` "" (only with an IPv6
        ``host_addr``): IPv6 peers follow the guest's IPv6 address.

        Returns the host port served (the kernel's choice when ``host_port`` is 0).
        """

    def remove(self, proto: str, host_addr: str, host_port: int) -> None:
        """Stop listening on the host port (flows already forwarded go on)."""


def _cstr(value: Any) -> bytes | None:
    """A string value as C code sees it (up to the first NUL); None for other types."""
    if not isinstance(value, bytes):
        return None
    return value.split(b"\0", 1)[0]


def _c_int(value: Any) -> int:
    """``(int)json_object_dotget_number(...)``: 0 for a non-number, truncated toward zero."""
    if not isinstance(value, float) or math.isnan(value):
        return 0
    if not -(2**31) <= value < 2**31:
        return -(2**31)  # what x86 gives for an out-of-range conversion (undefined in C)
    return int(value)


def _dotget(obj: dict[bytes, Any], *path: bytes) -> Any:
    for name in path[:-1]:
        obj = obj.get(name)  # type: ignore[assignment]
        if not isinstance(obj, dict):
            return None
    return obj.get(path[-1])


_INET_PTON4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")


def inet_pton4(text: bytes) -> str | None:
    """glibc's ``inet_pton(AF_INET, ...)``: strict dotted quad; the address text or None."""
    if not _INET_PTON4.fullmatch(text) or any(int(p) > 255 for p in text.split(b".")):
        return None
    return text.decode()


def inet_pton6(text: bytes) -> bytes | None:
    """glibc's ``inet_pton(AF_INET6, ...)`` (no zone); the 16 bytes or None."""
    try:
        return socket.inet_pton(socket.AF_INET6, text.decode("ascii"))
    except (UnicodeDecodeError, OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Ipv6Forwarding:
    """What the API needs to know of the link's IPv6 (our extension, module docstring)."""

    #: The guest's prefix (``--cidr6``): IPv6 guest addresses must lie in it ...
    network6: ipaddress.IPv6Network
    #: ... and not be one of ours (the gateway, the DNS server).
    ours: frozenset[bytes]
    #: Where a forward without a guest address sends IPv6 peers now (None: not known).
    guest_addr6: Callable[[], bytes | None]


_V4_MAPPED = bytes(10) + b"\xff\xff"


class ApiHandler:
    """slirp4netns's request handling, sans I/O: request bytes in, reply bytes out."""

    def __init__(self, forwarder: Forwarder, default_guest_addr: str,
                 stats: Callable[[], bytes] | None = None,
                 ipv6: Ipv6Forwarding | None = None) -> None:
        self.forwarder = forwarder
        self.default_guest_addr = default_guest_addr
        #: IPv6 addresses in add_hostfwd (None: IPv6 is not enabled, they are refused).
        self.ipv6 = ipv6
        #: ``get_stats``'s answer, made when asked; None: the command is unknown.
        self.stats = stats
        self.forwards: list[HostFwd] = []
        self.next_id = 1

    def reply_for(self, data: bytes, final: bool) -> bytes | None:
        """The reply to ``data`` as one client's request, or None if more bytes may complete it.

        ``final`` means nothing more will come (half-close, timeout).
        """
        return Request(self).feed(data, final)

    def execute(self, request: Any) -> bytes:
        if not isinstance(request, dict):
            return NOT_OBJECT
        execute = _cstr(request.get(b"execute"))
        if execute is None:
            return NO_EXECUTE
        if execute == b"add_hostfwd":
            return self._add(request)
        if execute == b"list_hostfwd":
            return b'{"entries":[' + b",".join(
                f.to_json(self._shown_guest_addr(f)) for f in self.forwards) + b"]}"
        if execute == b"remove_hostfwd":
            return self._remove(request)
        if execute == b"get_stats" and self.stats is not None:
            return self.stats()
        return UNKNOWN_EXECUTE

    def _add(self, request: dict[bytes, Any]) -> bytes:
        proto = _cstr(_dotget(request, b"arguments", b"proto"))
        if proto not in (b"tcp", b"udp"):
            return bad_argument("add_hostfwd", "proto")
        host_text = _cstr(_dotget(request, b"arguments", b"host_addr")) or b"0.0.0.0"
        host_addr = inet_pton4(host_text)
        if host_addr is None:
            host_addr, why = self._host_addr6(host_text)
            if host_addr is None:
                return bad_argument("add_hostfwd", "host_addr" + why)
        host_port_value = _dotget(request, b"arguments", b"host_port")
        host_port = _c_int(host_port_value)
        # Our extension: the number 0 asks for any free port (0.5 still truncates to a refusal).
        any_port = isinstance(host_port_value, float) and host_port_value == 0
        if not (0 < host_port < 65536 or any_port):
            return bad_argument("add_hostfwd", "host_port")
        guest_text = _cstr(_dotget(request, b"arguments", b"guest_addr"))
        if guest_text:
            guest_addr = inet_pton4(guest_text)
            if guest_addr is None:
                guest_addr, why = self._guest_addr6(guest_text)
                if guest_addr is None:
                    return bad_argument("add_hostfwd", "guest_addr" + why)
        elif ":" in host_addr:
            guest_addr = ""  # IPv6 peers follow the guest's IPv6 address (module docstring)
        else:
            guest_addr = self.default_guest_addr
        guest_port = _c_int(_dotget(request, b"arguments", b"guest_port"))
        if not 0 < guest_port < 65536:
            return bad_argument("add_hostfwd", "guest_port")
        try:
            host_port = self.forwarder.add(proto.decode(), host_addr, host_port, guest_addr,
                                           guest_port)
        except OSError as exc:
            log.warning("api: cannot forward %s %s:%d: %s", proto.decode(), host_addr,
                        host_port, exc.strerror or exc)
            return ADD_FAILED
        fwd = HostFwd(self.next_id, proto.decode(), host_addr, host_port, guest_addr,
                      guest_port)
        self.next_id += 1
        self.forwards.append(fwd)
        log.info("api: forwarding %s %s:%d to %s:%d (id %d)", fwd.proto, host_addr, host_port,
                 guest_addr or "the guest's IPv6 address", guest_port, fwd.id)
        if any_port:
            return b'{"return":{"id":%d,"host_port":%d}}' % (fwd.id, host_port)
        return b'{"return":{"id":%d}}' % fwd.id

    def _host_addr6(self, text: bytes) -> tuple[str | None, str]:
        """An IPv6 ``host_addr`` (our extension): (its text, "") or (None, why not)."""
        addr = inet_pton6(text)
        if addr is None:
            return None, ""  # slirp4netns's answer for any address it cannot read
        if self.ipv6 is None:
            return None, _NO_IPV6
        if addr[:12] == _V4_MAPPED:
            return None, f": {text.decode()} is IPv4-mapped; use the IPv4 address"
        return socket.inet_ntop(socket.AF_INET6, addr), ""

    def _guest_addr6(self, text: bytes) -> tuple[str | None, str]:
        """An IPv6 ``guest_addr`` (our extension): (its text, "") or (None, why not)."""
        addr = inet_pton6(text)
        if addr is None:
            return None, ""
        if self.ipv6 is None:
            return None, _NO_IPV6
        shown = socket.inet_ntop(socket.AF_INET6, addr)
        if ipaddress.IPv6Address(addr) not in self.ipv6.network6:
            return None, f": {shown} is outside the guest's prefix {self.ipv6.network6}"
        if addr in self.ipv6.ours:
            return None, f": {shown} is pyslirp's own address, not the guest's"
        return shown, ""

    def _shown_guest_addr(self, fwd: HostFwd) -> str:
        """``list_hostfwd``'s guest_addr: a forward without one shows where IPv6 peers
        go now ("" while the guest's IPv6 address is not known)."""
        if fwd.guest_addr or self.ipv6 is None:
            return fwd.guest_addr
        now = self.ipv6.guest_addr6()
        return "" if now is None else socket.inet_ntop(socket.AF_INET6, now)

    def _remove(self, request: dict[bytes, Any]) -> bytes:
        wanted = _c_int(_dotget(request, b"arguments", b"id"))
        for fwd in self.forwards:
            if fwd.id == wanted:
                break
        else:
            return bad_argument("remove_hostfwd", "id")
        try:
            self.forwarder.remove(fwd.proto, fwd.host_addr, fwd.host_port)
        except OSError as exc:
            log.warning("api: cannot remove forward %d: %s", fwd.id, exc)
            return REMOVE_FAILED
        self.forwards.remove(fwd)
        log.info("api: removed forward %d (%s %s:%d)", fwd.id, fwd.proto, fwd.host_addr,
                 fwd.host_port)
        return REMOVE_OK


class Request:
    """One connection's request as it arrives: fed each read, it says when to answer what.

    The answer after each :meth:`feed` is :meth:`ApiHandler.reply_for` of all
    the bytes so far, but the JSON is parsed as it comes (:class:`JsonParser`),
    so a request sent a byte at a time costs what one sent at once does.
    """

    __slots__ = ("_handler", "_json", "_size", "_ended")

    def __init__(self, handler: ApiHandler) -> None:
        self._handler = handler
        self._json = JsonParser()
        self._size = 0
        #: A NUL came: the C string slirp4netns parses ends there.
        self._ended = False

    def feed(self, data: bytes, final: bool) -> bytes | None:
        """The reply once the request can be answered, else None (``final``: no more comes)."""
        self._size += len(data)
        if self._size >= MAX_REQUEST:
            return TOO_LARGE
        if not self._ended:
            text, nul, _ = data.partition(b"\0")
            self._ended = bool(nul)
            try:
                if self._json.feed(text):
                    return self._handler.execute(self._json.value)
            except JsonError:
                return CANNOT_PARSE
        if final or self._ended:
            return CANNOT_PARSE
        return None


# ---- the socket ------------------------------------------------------------------------

# ApiError and bind_unix live in pyslirp.api_listen, which the command line imports to
# make the socket before this module (asyncio, the stack) is loaded.


class _Client:
    __slots__ = ("sock", "fd", "buf", "request", "timer", "out")

    def __init__(self, sock: socket.socket, request: Request) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        #: What it sent, for the debug log and the read limit.
        self.buf = bytearray()
        self.request = request
        self.timer: asyncio.TimerHandle | None = None
        self.out = b""


class ApiServer:
    """Serves an :class:`ApiHandler` on a Unix socket with the loop's readiness callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, handler: ApiHandler, *,
                 timeout: float = DEFAULT_TIMEOUT, max_clients: int = MAX_CLIENTS,
                 sock: socket.socket | None = None) -> None:
        """``sock``: the socket :func:`bind_unix` made at ``path`` already (else made here)."""
        self.loop = loop
        self.path = path
        self.handler = handler
        self.timeout = timeout
        self.max_clients = max_clients
        self.clients: dict[int, _Client] = {}
        self._sock: socket.socket | None = sock if sock is not None else bind_unix(path)
        self._ino = os.stat(path).st_ino
        # Held so the socket file can still be removed after --enable-sandbox has
        # pivoted the root away (the path no longer resolves then; the directory fd does).
        self._dir_fd: int | None = os.open(os.path.dirname(os.path.abspath(path)),
                                           os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._name = os.path.basename(path)
        self._accepting = False
        self._start_accepting()

    def _start_accepting(self) -> None:
        if not self._accepting and self._sock is not None:
            self._accepting = True
            self.loop.add_reader(self._sock.fileno(), self._on_accept)

    def _stop_accepting(self) -> None:
        if self._accepting and self._sock is not None:
            self._accepting = False
            self.loop.remove_reader(self._sock.fileno())

    def _on_accept(self) -> None:
        assert self._sock is not None
        while len(self.clients) < self.max_clients:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: the listener stays readable; don't spin on it.
                log.warning("api: accept failed: %s; pausing %.1f s", exc.strerror,
                            _ACCEPT_PAUSE)
                self._stop_accepting()
                self.loop.call_later(_ACCEPT_PAUSE, self._start_accepting)
                return
            conn.setblocking(False)
            client = _Client(conn, Request(self.handler))
            self.clients[client.fd] = client
            client.timer = self.loop.call_later(self.timeout, self._on_timeout, client)
            self.loop.add_reader(client.fd, self._on_readable, client)
        self._stop_accepting()  # full: the rest wait in the listen backlog

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST - len(client.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        client.buf += data
        reply = client.request.feed(data, final=not data)
        if reply is not None:
            self._reply(client, reply)

    def _on_timeout(self, client: _Client) -> None:
        client.timer = None
        if client.fd in self.clients and not client.out:
            self._reply(client, client.request.feed(b"", final=True) or CANNOT_PARSE)

    def _reply(self, client: _Client, reply: bytes) -> None:
        log.debug("api: request %r -> %r", bytes(client.buf), reply)
        self.loop.remove_reader(client.fd)
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        client.out = reply
        self._send(client)

    def _send(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(client)
            return
        client.out = client.out[sent:]
        if client.out:
            # A reply larger than the socket buffer (a very long list): finish it later,
            # but never wait on a client that does not read for longer than the timeout.
            self.loop.add_writer(client.fd, self._on_writable, client)
            client.timer = self.loop.call_later(self.timeout, self._close, client)
            return
        self._close(client)

    def _on_writable(self, client: _Client) -> None:
        self.loop.remove_writer(client.fd)
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        self._send(client)

    def _close(self, client: _Client) -> None:
        if self.clients.pop(client.fd, None) is None:
            return
        if client.timer is not None:
            client.timer.cancel()
            client.timer = None
        self.loop.remove_reader(client.fd)
        self.loop.remove_writer(client.fd)
        # The client learns it is done (EOF) only after it has left `clients`: shut down
        # explicitly too, in case a forked child still holds a copy of the fd.
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_RDWR)
        client.sock.close()
        self._start_accepting()

    def close(self) -> None:
        """Stop serving, drop every client, remove the socket file (if it is still ours)."""
        for client in list(self.clients.values()):
            self._close(client)
        self._stop_accepting()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                if os.lstat(self._name, dir_fd=self._dir_fd).st_ino == self._ino:
                    os.unlink(self._name, dir_fd=self._dir_fd)
            except OSError:
                pass
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None



def api_socket(path: str, listener: socket.socket | None = None) -> ApiFactory:
    """The runtime plug-in serving this API at ``path`` (``--api-socket``).

    The runtime calls it with its loop, the link's port forwarder and the guest
    address forwards default to (pyslirp.runtime.spec.ApiFactory); the server
    it returns is closed, and the socket removed, when the runtime stops.
    ``get_stats`` reads the stack the forwarder forwards into. ``listener``: the
    socket :func:`bind_unix` made at ``path`` already (the command line binds it
    early, before this module is imported), else it is made when the runtime calls.
    """
    def start(loop: asyncio.AbstractEventLoop, forwarder: Any,
              default_guest_addr: str) -> ApiServer:
        stack = forwarder.stack
        config = stack.config
        ipv6 = Ipv6Forwarding(config.network6, frozenset((config.gateway6, config.dns6)),
                              forwarder.guest_addr6) if config.enable_ipv6 else None
        handler = ApiHandler(forwarder, default_guest_addr,
                             stats=lambda: stats_module.api_reply(stack), ipv6=ipv6)
        server = ApiServer(loop, path, handler, sock=listener)
        log.info("API socket at %s", path)
        return server
    return start
