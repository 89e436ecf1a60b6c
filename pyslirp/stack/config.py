"""The virtual network's addresses and switches, derived as slirp4netns does."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from pyslirp.stack.admission import DEFAULT_NEW_FLOW_BURST, DEFAULT_NEW_FLOW_RATE
from pyslirp.wire import netparams
from pyslirp.wire.dhcp import domain_labels
from pyslirp.wire.ipv6 import MIN_MTU as IPV6_MIN_MTU

# Re-exported: the MTU range and defaults are netparams' (one rule for every front end).
from pyslirp.wire.netparams import DEFAULT_CIDR as DEFAULT_CIDR
from pyslirp.wire.netparams import DEFAULT_MTU as DEFAULT_MTU
from pyslirp.wire.netparams import MAX_MTU as MAX_MTU
from pyslirp.wire.netparams import MIN_MTU as MIN_MTU

log = logging.getLogger("pyslirp")

DEFAULT_CIDR6 = "fd00::/64"
#: The only prefix length served: SLAAC forms an address from a /64 and a 64-bit
#: interface identifier (RFC 4862 5.5.3, RFC 4291 2.5.1); Linux ignores any other.
CIDR6_PREFIXLEN = 64
#: Busy polling after work (seconds): long enough to catch a loopback peer's answer on
#: this kind of VM (bench/README.md, "Latency"), short enough to cost little CPU.
DEFAULT_BUSY_POLL = 50e-6
#: Bytes all TCP flows of one stack may hold together (send queues toward the guest,
#: backlogs toward host peers that do not read, out-of-order data): 256 MiB, i.e. 32
#: flows stalled in both directions at the default 4 MiB per direction.
DEFAULT_MAX_BUFFERED = 256 << 20
#: Smallest accepted --max-buffered: a few full windows, so one flow can still run.
MIN_MAX_BUFFERED = 1 << 20
#: The MAC address of the virtual gateway/DNS, as libslirp builds it (52:55 + 10.0.2.2).
DEFAULT_GUEST_MAC = None
#: The router's link-local address, libslirp's (its LINKLOCAL_ADDR).
LINK_LOCAL6 = bytes.fromhex("fe800000000000000000000000000002")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it."""


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """Parse a --cidr value the way slirp4netns accepts it (:func:`netparams.parse_cidr`)."""
    try:
        network, prefix = netparams.parse_cidr(text)
    except netparams.NetParamError as exc:
        raise ConfigError(f"invalid CIDR {text!r}: {exc}") from None
    return ipaddress.IPv4Network((network, prefix))


def parse_cidr6(text: str) -> ipaddress.IPv6Network:
    """Parse a --cidr6 value: a /64 network address that can be a unicast prefix."""
    if "/" not in text:
        raise ConfigError(f"invalid IPv6 prefix {text!r}: no prefix length")
    try:
        net = ipaddress.IPv6Network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(f"invalid IPv6 prefix {text!r}: {exc}") from None
    if net.prefixlen != CIDR6_PREFIXLEN:
        raise ConfigError(f"invalid IPv6 prefix {text!r}: the prefix length must be "
                          f"{CIDR6_PREFIXLEN} (SLAAC forms addresses from a /64)")
    addr = net.network_address
    if addr.is_multicast or addr.is_link_local or addr.is_loopback or addr.is_unspecified \
            or addr.ipv4_mapped is not None:
        raise ConfigError(f"invalid IPv6 prefix {text!r}: not a unicast prefix a guest can "
                          "use (multicast, link-local, loopback, unspecified or IPv4-mapped)")
    return net


#: What a search domain's labels may contain: letters, digits, hyphen (RFC 952/1123
#: host names) and underscore (used in practice). Guests copy the DHCP search list
#: into their resolv.conf, where anything else (spaces, newlines) would not be a name.
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def search_domain_problem(domain: str) -> str | None:
    """Why ``domain`` cannot be served as a search domain, or None if it can."""
    try:
        labels = domain_labels(domain)
    except ValueError as exc:
        return str(exc)
    if not labels:
        return "the root domain is no search domain"
    for label in labels:
        if not _NAME_BYTES.issuperset(label):
            return (f"label {label.decode(errors='replace')!r} has characters other than "
                    "letters, digits, '-' and '_'")
    return None


def valid_search_domains(domains: Iterable[str], source: str = "configuration") -> list[str]:
    """``domains`` without those that cannot be served, each left out with a warning.

    Search domains come from the host's resolv.conf or a CNI config, which the
    guest must not be able to break DHCP with, nor the host by one typo.
    """
    good = []
    for domain in domains:
        problem = search_domain_problem(domain)
        if problem is None:
            good.append(domain)
        else:
            log.warning("ignoring search domain %r from the %s: %s", domain, source, problem)
    return good


@dataclass(slots=True)
class NetConfig:
    """Everything the stack needs to know about the virtual network.

    Addresses are 4-byte ``bytes`` for the hot path; ``network`` keeps the
    ``ipaddress`` object for membership tests and text.
    """

    network: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network(DEFAULT_CIDR))
    mtu: int = DEFAULT_MTU
    #: The MAC we answer with for the gateway and DNS addresses.
    our_mac: bytes = b""
    #: The MAC the TAP device gets (None: the kernel picks one).
    guest_mac: bytes | None = None
    disable_host_loopback: bool = False
    disable_dns: bool = False
    #: DNS upstreams as (host, port); empty means "read /etc/resolv.conf".
    dns_upstreams: list[tuple[str, int]] = field(default_factory=list)
    #: Served by DHCP (options 15 and 119); invalid ones are left out (with a warning)
    #: when the config is made. Whoever changes the list later passes it through
    #: :func:`valid_search_domains` first (:func:`~pyslirp.stack.dns.parse_resolv_conf`
    #: does); the DHCP server filters it again rather than fail.
    search_domains: list[str] = field(default_factory=list)
    #: Frames on the link carry a virtio-net header.
    vnet_hdr: bool = True
    #: The link accepts GSO super-frames and partial checksums (TSO offload on).
    offload: bool = True
    #: The TAP also takes UDP super-frames (TUN_F_USO4/6): a run of equal-size replies
    #: from one host peer goes to the guest as one frame its kernel cuts (vnet
    #: GSO_UDP_L4). Set by the runtime from what TUNSETOFFLOAD accepted.
    uso: bool = False
    #: For the runtime (the stack never sleeps): after each burst of work, keep
    #: polling the loop instead of sleeping for this many seconds; 0 = off.
    busy_poll: float = DEFAULT_BUSY_POLL
    dhcp_lease_seconds: int = 86400
    dhcp_pool_size: int = 16
    #: Stack-wide bound on the bytes TCP flows buffer (``--max-buffered``): as it
    #: fills, windows toward the guest shrink and host sockets stop being read.
    max_buffered: int = DEFAULT_MAX_BUFFERED
    #: Admission of new flows from the guest (pyslirp/stack/admission.py): each of the
    #: TCP and UDP engines lets in this many new flows per second, in bursts of up
    #: to ``new_flow_burst``; past that, SYNs (and datagrams to new destinations)
    #: are dropped before any host syscall and counted. Destinations that lately
    #: accepted a TCP connection are exempt.
    new_flow_rate: float = DEFAULT_NEW_FLOW_RATE
    new_flow_burst: int = DEFAULT_NEW_FLOW_BURST
    #: Serve IPv6 beside IPv4 (``-6``): NDP, router advertisements, ICMPv6 echo, DHCPv6.
    enable_ipv6: bool = False
    #: The IPv6 prefix advertised for SLAAC (always a /64, see :func:`parse_cidr6`).
    network6: ipaddress.IPv6Network = field(
        default_factory=lambda: ipaddress.IPv6Network(DEFAULT_CIDR6))

    @property
    def gateway(self) -> bytes:
        return (self.network.network_address + 2).packed

    @property
    def dns(self) -> bytes:
        return (self.network.network_address + 3).packed

    @property
    def guest_addr(self) -> bytes:
        """The address ``--configure`` gives the TAP (network + 100)."""
        return (self.network.network_address + 100).packed

    @property
    def dhcp_start(self) -> bytes:
        return (self.network.network_address + 15).packed

    @property
    def netmask(self) -> bytes:
        return self.network.netmask.packed

    @property
    def broadcast(self) -> bytes:
        return self.network.broadcast_address.packed

    @property
    def gateway6(self) -> bytes:
        return (self.network6.network_address + 2).packed

    @property
    def dns6(self) -> bytes:
        return (self.network6.network_address + 3).packed

    @property
    def link_local6(self) -> bytes:
        """Our link-local address, the guest's router: ``fe80::2``, as libslirp's.

        A guest configured by slirp4netns shows ``default via fe80::2``; scripts and
        firewall rules written against it keep working."""
        return LINK_LOCAL6

    def __post_init__(self) -> None:
        try:
            netparams.check_mtu(self.mtu)
        except netparams.NetParamError as exc:
            raise ConfigError(str(exc)) from None
        if self.enable_ipv6 and self.mtu < IPV6_MIN_MTU:
            raise ConfigError(f"MTU {self.mtu} is too small for IPv6 (at least "
                              f"{IPV6_MIN_MTU}, RFC 8200)")
        if self.network6.prefixlen != CIDR6_PREFIXLEN:
            raise ConfigError(f"IPv6 prefix {self.network6} must be a /{CIDR6_PREFIXLEN}")
        self.search_domains = valid_search_domains(self.search_domains)
        if self.max_buffered < MIN_MAX_BUFFERED:
            raise ConfigError(f"max_buffered {self.max_buffered} is below the minimum "
                              f"{MIN_MAX_BUFFERED} bytes")
        if not self.new_flow_rate > 0:
            raise ConfigError(f"new_flow_rate {self.new_flow_rate} must be above 0 "
                              f"(new flows per second)")
        if self.new_flow_burst < 1:
            raise ConfigError(f"new_flow_burst {self.new_flow_burst} must be at least 1")
        if not self.our_mac:
            # libslirp's convention: 52:55 followed by the gateway's IPv4 address.
            self.our_mac = b"\x52\x55" + self.gateway
