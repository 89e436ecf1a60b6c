"""Network parameters as people write them: the rules every front end and the stack apply.

Theory of operation
-------------------
The command line, the CNI plugin, the KubeVirt sidecar and the stack's
:class:`~pyslirp.stack.config.NetConfig` all take an MTU, a CIDR, a MAC, DNS
upstreams and interface names. Each rule is written here once; a front end
calls the parser and turns :class:`NetParamError` into its own error type and
wording (slirp4netns's for the CLI, a CNI error for the plugin, an argparse
message for the sidecar). ``str(error)`` says what is wrong in words a front
end can append after naming the value; ``error.kind`` tells which rule failed,
for front ends whose wording differs per rule.

The rules are slirp4netns's where it has one:

* MTU: 68 (IPv4's minimum datagram, the kernel's ``ETH_MIN_MTU``) to 65521
  (slirp4netns's ceiling); 1500 by default.
* CIDR: ``A.B.C.D/N`` with 1-3 decimal digits per octet and 1-2 for N (the
  shape slirp4netns's regex allows), octets as ``inet_pton`` reads them (no
  leading zeros, at most 255), N in 1..25 (the guest sits at network + 100),
  and no host bits set.
* MAC: six groups of one or two hex digits separated by ``:`` (as
  ``ether_aton`` reads them) or ``-``; it must be a unicast address and not
  all zeros, because the kernel refuses any other for an interface.
* IPv6 prefix (``--cidr6``, the CNI plugin's ``cidr6``): a /64 network
  address of a unicast prefix, no scope.
* DNS upstream: ``A.B.C.D``, ``A.B.C.D:PORT``, ``[IPv6]``, ``[IPv6]:PORT``
  or a bare IPv6 address (no port then); the port is 1..65535, 53 if absent.
* Interface names: what the kernel's ``dev_valid_name`` accepts.

Why pure Python: the CNI plugin executable may load only ``os``, ``sys``,
``_socket`` and ``_json`` (``tests/cni/test_protocol.py`` checks it; ``re``
and ``ipaddress`` each cost milliseconds per container), so this module
imports nothing and parses dotted quads and IPv6 text itself, accepting
exactly what :mod:`ipaddress` accepts (``tests/test_netparams.py`` compares).
Addresses come back as integers (IPv4) or text in :mod:`ipaddress`'s
canonical form (IPv6 upstreams).
"""

from __future__ import annotations

DEFAULT_MTU = 1500
#: The smallest IPv4 MTU (RFC 791: every host takes 68-byte datagrams unfragmented).
MIN_MTU = 68
#: slirp4netns's ceiling ("MTU must be a positive integer (< 65522)").
MAX_MTU = 65521
DEFAULT_CIDR = "10.0.2.0/24"
MIN_PREFIX = 1
#: /26 and longer leave no room for the guest at network + 100.
MAX_PREFIX = 25
DEFAULT_DNS_PORT = 53
#: The kernel's IFNAMSIZ (16) less the terminating NUL.
MAX_IFNAME_BYTES = 15

# NetParamError.kind values: which rule a value broke.
SYNTAX = "syntax"          #: not the expected shape at all
ADDRESS = "address"        #: the shape is right, an address in it is not
PREFIX = "prefix"          #: a CIDR's prefix length is out of range
HOST_BITS = "host-bits"    #: a CIDR's address is not its network's address
PORT = "port"              #: a port number is out of range or not a number
RANGE = "range"            #: a number is out of range
MULTICAST = "multicast"    #: a MAC with the group bit set
ZERO = "zero"              #: the all-zeros MAC
RESERVED = "reserved"      #: an interface name only the kernel refuses

_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class NetParamError(ValueError):
    """A network parameter is invalid: ``str()`` says what is wrong, ``kind`` which rule."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(problem)
        self.kind = kind


# ------------------------------------------------------------------ MTU


def check_mtu(mtu: int) -> int:
    """``mtu`` if it is in MIN_MTU..MAX_MTU."""
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise NetParamError(RANGE, f"MTU {mtu} is out of range {MIN_MTU}..{MAX_MTU}")
    return mtu


# ------------------------------------------------------------------ IPv4 and CIDR


def _is_decimal(text: str, max_len: int) -> bool:
    """1..max_len ASCII digits (str.isdigit alone would take other scripts' digits too)."""
    return 0 < len(text) <= max_len and _DIGITS.issuperset(text)


def parse_ipv4(text: str) -> int:
    """A dotted quad as ``inet_pton`` and :mod:`ipaddress` read it, as a 32-bit integer."""
    octets = text.split(".")
    if len(octets) != 4:
        raise NetParamError(ADDRESS, f"{text!r} is not an IPv4 address (expected A.B.C.D)")
    value = 0
    for octet in octets:
        # A leading zero would be octal to inet_aton, so inet_pton refuses it outright.
        if not _is_decimal(octet, 3) or (octet[0] == "0" and octet != "0") or int(octet) > 255:
            raise NetParamError(ADDRESS, f"{text!r} is not an IPv4 address (octet {octet!r})")
        value = value << 8 | int(octet)
    return value


def format_ipv4(value: int) -> str:
    return ".".join(str(value >> shift & 0xFF) for shift in (24, 16, 8, 0))


def prefix_mask(prefix: int) -> int:
    """The netmask of a prefix length, as a 32-bit integer."""
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


def _cidr_shape(text: str) -> tuple[str, str] | None:
    """(address, prefix) text if ``text`` looks like slirp4netns's ``A.B.C.D/N``."""
    address, slash, prefix = text.partition("/")
    octets = address.split(".")
    if not slash or len(octets) != 4 or not all(_is_decimal(o, 3) for o in octets):
        return None
    return (address, prefix) if _is_decimal(prefix, 2) else None


def parse_cidr(text: str, *, strict: bool = True) -> tuple[int, int]:
    """``A.B.C.D/N`` as (network address, prefix length), by slirp4netns's rules.

    The checks run in slirp4netns's order (shape, address, prefix, host bits),
    so each front end can keep its message for the first one that fails.
    ``strict=False`` skips the host-bits check and masks them off instead
    (what a message suggesting the network address needs).
    """
    shape = _cidr_shape(text)
    if shape is None:
        raise NetParamError(SYNTAX, "expected A.B.C.D/PREFIX")
    address = parse_ipv4(shape[0])
    prefix = int(shape[1])
    if not MIN_PREFIX <= prefix <= MAX_PREFIX:
        raise NetParamError(PREFIX, f"prefix length must be {MIN_PREFIX}..{MAX_PREFIX}")
    network = address & prefix_mask(prefix)
    if strict and network != address:
        raise NetParamError(HOST_BITS, f"host bits are set (the network is "
                                       f"{format_ipv4(network)}/{prefix})")
    return network, prefix


# ------------------------------------------------------------------ IPv6


def _parse_hextets(text: str) -> list[int]:
    """The eight 16-bit groups of an IPv6 address without scope (RFC 4291 2.2 text forms)."""
    parts = text.split(":")
    if len(parts) < 3:
        raise ValueError("too few groups")
    if "." in parts[-1]:  # the last 32 bits as a dotted quad (::ffff:192.0.2.1)
        low = parse_ipv4(parts.pop())
        parts += [f"{low >> 16:x}", f"{low & 0xFFFF:x}"]
    if len(parts) > 9:
        raise ValueError("too many groups")
    inner_empty = [i for i in range(1, len(parts) - 1) if not parts[i]]
    if len(inner_empty) > 1:
        raise ValueError("more than one '::'")
    if inner_empty:
        skip = inner_empty[0]
        head, tail = parts[:skip], parts[skip + 1:]
        # A leading or trailing ':' is allowed only as half of the '::'.
        if head == [""]:
            head = []
        if tail == [""]:
            tail = []
        if len(head) + len(tail) > 7:
            raise ValueError("'::' stands for no group")
    else:
        if len(parts) != 8:
            raise ValueError("expected 8 groups")
        head, tail = parts, []
    groups = head + tail
    if not all(0 < len(g) <= 4 and _HEX_DIGITS.issuperset(g) for g in groups):
        raise ValueError("a group is not 1-4 hex digits")
    values = [int(g, 16) for g in head]
    return values + [0] * (8 - len(head) - len(tail)) + [int(g, 16) for g in tail]


def parse_ipv6(text: str) -> str:
    """An IPv6 address (with an optional ``%scope``) in :mod:`ipaddress`'s canonical text."""
    address, percent, scope = text.partition("%")
    if percent and (not scope or "%" in scope):
        raise NetParamError(ADDRESS, f"{text!r} is not an IPv6 address (bad scope)")
    try:
        groups = _parse_hextets(address)
    except (ValueError, NetParamError) as exc:
        raise NetParamError(ADDRESS, f"{text!r} is not an IPv6 address ({exc})") from None
    return _compress(groups) + (f"%{scope}" if percent else "")


#: The one IPv6 prefix length served: SLAAC forms an address from a /64 and a 64-bit
#: interface identifier (RFC 4862 5.5.3, RFC 4291 2.5.1), and Linux ignores any other.
CIDR6_PREFIXLEN = 64


def parse_cidr6(text: str) -> tuple[int, int]:
    """An IPv6 ``PREFIX/64`` as (network address as a 128-bit integer, 64).

    The rule of ``--cidr6`` (:func:`pyslirp.stack.config.parse_cidr6` says it
    with :mod:`ipaddress`): a /64 network address, no scope, and a prefix a
    guest can take addresses from (not multicast, link-local, loopback,
    unspecified or IPv4-mapped). Kinds: SYNTAX, ADDRESS, PREFIX, HOST_BITS.
    """
    address, slash, prefix_text = text.partition("/")
    if not slash:
        raise NetParamError(SYNTAX, "expected PREFIX/64")
    if not _is_decimal(prefix_text, 3) or int(prefix_text) > 128:
        raise NetParamError(SYNTAX, f"{prefix_text!r} is not a prefix length")
    if "%" in address:
        raise NetParamError(ADDRESS, f"{address!r} has a scope; a prefix has none")
    try:
        groups = _parse_hextets(address)
    except (ValueError, NetParamError) as exc:
        raise NetParamError(ADDRESS, f"{address!r} is not an IPv6 address ({exc})") from None
    value = 0
    for group in groups:
        value = value << 16 | group
    prefix = int(prefix_text)
    if prefix != CIDR6_PREFIXLEN:
        raise NetParamError(PREFIX, f"the prefix length must be {CIDR6_PREFIXLEN} (SLAAC "
                                    "forms addresses from a /64)")
    if value & ((1 << 64) - 1):
        network = value >> 64 << 64
        raise NetParamError(HOST_BITS, f"host bits are set (the network is "
                                       f"{format_ipv6(network)}/{prefix})")
    top = value >> 120
    mapped = value >> 32 == 0xFFFF
    if top == 0xFF or value >> 118 == 0xFE80 >> 6 or value in (0, 1) or mapped:
        raise NetParamError(ADDRESS, "not a unicast prefix a guest can use (multicast, "
                                     "link-local, loopback, unspecified or IPv4-mapped)")
    return value, prefix


def format_ipv6(value: int) -> str:
    """A 128-bit integer as RFC 5952 text (what :mod:`ipaddress` prints)."""
    return _compress([value >> shift & 0xFFFF for shift in range(112, -1, -16)])


def _compress(groups: list[int]) -> str:
    """RFC 5952 text: lower-case hex, the first longest run of 2+ zero groups as '::'."""
    best_start, best_len, start = -1, 1, -1
    for i, group in enumerate(groups + [1]):  # the sentinel closes a trailing run
        if group == 0 and start < 0:
            start = i
        elif group != 0 and start >= 0:
            if i - start > best_len:
                best_start, best_len = start, i - start
            start = -1
    hextets = [f"{g:x}" for g in groups]
    if best_start < 0:
        return ":".join(hextets)
    head = ":".join(hextets[:best_start])
    tail = ":".join(hextets[best_start + best_len:])
    return f"{head}::{tail}"


# ------------------------------------------------------------------ MAC


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` (one or two hex digits a group; ``-`` works too) of a unicast NIC."""
    groups = text.replace("-", ":").split(":")
    if len(groups) != 6 or not all(0 < len(g) <= 2 and _HEX_DIGITS.issuperset(g)
                                   for g in groups):
        raise NetParamError(SYNTAX, "expected 6 hex bytes separated by ':'")
    mac = bytes(int(g, 16) for g in groups)
    if mac[0] & 1:
        raise NetParamError(MULTICAST, "a multicast address")
    if not any(mac):
        raise NetParamError(ZERO, "all zeros")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


# ------------------------------------------------------------------ DNS upstreams

_UPSTREAM_SYNTAX = "expected IPv4[:PORT] or [IPv6][:PORT]"


def parse_dns_upstream(text: str) -> tuple[str, int]:
    """``A.B.C.D[:PORT]``, ``[IPv6][:PORT]`` or a bare IPv6 address, as (host, port)."""
    port_text: str | None = None
    try:
        if text.startswith("["):
            inner, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise NetParamError(SYNTAX, _UPSTREAM_SYNTAX)
            host = parse_ipv6(inner)
            port_text = rest[1:] if rest else None
        elif text.count(":") == 1:
            address, _, port_text = text.partition(":")
            host = format_ipv4(parse_ipv4(address))
        elif ":" in text:
            host = parse_ipv6(text)
        else:
            host = format_ipv4(parse_ipv4(text))
    except NetParamError:
        raise NetParamError(SYNTAX, _UPSTREAM_SYNTAX) from None
    if port_text is None:
        return host, DEFAULT_DNS_PORT
    return host, _parse_port(port_text)


def _parse_port(text: str) -> int:
    if not _is_decimal(text, len(text)) or not 0 < int(text) < 65536:
        raise NetParamError(PORT, "port must be 1..65535")
    return int(text)


# ------------------------------------------------------------------ interface names


def check_ifname(name: str) -> str:
    """``name`` if the kernel takes it for an interface (``dev_valid_name``).

    Kind RESERVED marks what only the kernel refuses (``:``, ``.``, ``..``),
    which slirp4netns passes on and fails on later; SYNTAX and RANGE the rest.
    """
    if not name:
        raise NetParamError(RANGE, "must not be empty")
    if name in (".", ".."):
        raise NetParamError(RESERVED, "must not be '.' or '..'")
    if len(name.encode()) > MAX_IFNAME_BYTES:
        raise NetParamError(RANGE, f"must be shorter than {MAX_IFNAME_BYTES + 1} bytes")
    bad_chars = "must not contain '/', ':', NUL or whitespace"
    if any(c in "/\0" or c.isspace() for c in name):
        raise NetParamError(SYNTAX, bad_chars)
    if ":" in name:  # an alias label (eth0:1) to the kernel
        raise NetParamError(RESERVED, bad_chars)
    return name
