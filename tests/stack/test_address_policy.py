"""The address policy as the whole stack applies it: which guest destinations may reach the
host, and what the guest hears when one may not.

Frames go in through :meth:`Stack.receive_frame` (the path a TAP frame takes, fragments
and all), the host is a recorder, and the frames back to the guest are dissected by
scapy. The guarantee under test, for ``--disable-host-loopback`` above all: no address
trick makes the stack ask the host for a socket toward its loopback (or toward
``0.0.0.0``, which Linux connects to loopback), and the guest gets what a router would
say (ICMP unreachable, or nothing for broadcast and multicast, RFC 1122 3.2.2), never a
connection.

The one door to the host's loopback that stays open with loopback disabled is the DNS
forwarder: ``10.0.2.3:53`` (UDP and TCP) goes to the configured upstreams, which may
well be on loopback (systemd-resolved's 127.0.0.53), as with slirp4netns.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_LSRR, defragment, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from pyslirp.wire import icmp
from tests.stack import fakes

GUEST_MAC = "02:00:00:00:00:64"
GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
UPSTREAM = ("127.0.0.1", 5353)
#: Host calls that would open or use a socket toward a destination.
REACHING_CALLS = {"tcp_connect", "udp_open", "udp_send", "icmp_echo", "dns_send"}


class Harness(fakes.StackHarness):
    """The shared stack rig; frames in as scapy packets, frames out as scapy packets."""

    def __init__(self, **cfg: Any) -> None:
        cfg.setdefault("dns_upstreams", [UPSTREAM])
        super().__init__(**cfg)
        self.our_mac = ":".join(f"{b:02x}" for b in self.config.our_mac)

    def send(self, pkt: Packet, fragment_size: int | None = None) -> None:
        """One IP packet from the guest, as one frame or as fragments of ``fragment_size``."""
        pieces = [pkt] if fragment_size is None else fragment(pkt, fragment_size)
        for piece in pieces:
            frame = Ether(src=GUEST_MAC, dst=self.our_mac) / piece
            self.stack.receive_frame(memoryview(bytes(frame)), self.now)
        self.stack.flush(self.now)

    def take(self) -> list[Packet]:
        """What the guest got since the last call, fragments reassembled."""
        return list(defragment([Ether(f)[IP] for f in self.replies()]))

    def reaching_calls(self) -> list[tuple[Any, ...]]:
        return [c for c in self.host.calls if c[0] in REACHING_CALLS]


def syn(dst: str, dport: int, **ip: Any) -> Packet:
    return IP(src=GUEST, dst=dst, **ip) / TCP(sport=40000, dport=dport, flags="S", seq=1000)


def datagram(dst: str, dport: int, size: int = 16) -> Packet:
    return IP(src=GUEST, dst=dst) / UDP(sport=40000, dport=dport) / Raw(b"x" * size)


def echo(dst: str, size: int = 16) -> Packet:
    return IP(src=GUEST, dst=dst) / ICMP(type=8, id=7, seq=1) / Raw(b"p" * size)


@dataclass(frozen=True)
class Trick:
    """A destination a guest might write to reach the host's loopback, and what it gets."""

    name: str
    dst: str
    port: int
    #: The ICMP unreachable code a TCP SYN gets (None: silently dropped).
    tcp_code: int | None
    #: The guest's ping gets "administratively prohibited" (False: nothing at all).
    ping_prohibited: bool


SILENT = None
TRICKS = [
    Trick("loopback", "127.0.0.1", 8080, icmp.NET_UNREACH, True),
    Trick("loopback-other", "127.1.2.3", 8080, icmp.NET_UNREACH, True),
    Trick("this-host", "0.0.0.0", 8080, SILENT, True),
    Trick("this-network", "0.1.2.3", 8080, icmp.NET_UNREACH, True),
    Trick("broadcast", "255.255.255.255", 8080, SILENT, False),
    Trick("subnet-broadcast", "10.0.2.255", 8080, SILENT, False),
    Trick("multicast", "224.0.0.1", 8080, SILENT, False),
    Trick("multicast-high", "239.255.255.250", 1900, SILENT, False),
    Trick("network-address", "10.0.2.0", 8080, icmp.NET_UNREACH, True),
    Trick("other-virtual-address", "10.0.2.77", 8080, icmp.NET_UNREACH, True),
    Trick("dns-address-other-port", DNS, 8080, icmp.NET_UNREACH, False),
]
TRICK_IDS = [t.name for t in TRICKS]
GATEWAY_DISABLED = Trick("gateway", GATEWAY, 8080, icmp.NET_UNREACH, False)


def assert_unreachable(replies: list[Packet], code: int, about: Packet) -> None:
    """One ICMP destination unreachable from the gateway, quoting what the guest sent."""
    [reply] = replies
    assert (reply.src, reply.dst) == (GATEWAY, GUEST)
    assert (reply[ICMP].type, reply[ICMP].code) == (icmp.DEST_UNREACH, code)
    quoted = IP(bytes(reply[ICMP].payload))
    assert (quoted.src, quoted.dst, quoted.proto) == (GUEST, about.dst, about.proto)


# ---- every trick, TCP / UDP / ICMP, whole and fragmented ---------------------------------

@pytest.mark.parametrize("disable_host_loopback", [True, False])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("trick", TRICKS, ids=TRICK_IDS)
def test_tcp_to_a_trick_address_reaches_no_host_socket(trick: Trick, fragmented: bool,
                                                       disable_host_loopback: bool) -> None:
    h = Harness(disable_host_loopback=disable_host_loopback)
    pkt = syn(trick.dst, trick.port)
    # Padded with a NOP-filled options area so that fragments of 8 bytes split the header.
    pkt[TCP].options = [("NOP", None)] * 16
    h.send(pkt, fragment_size=8 if fragmented else None)
    assert h.reaching_calls() == []
    assert h.stack.tcp.flows == {}
    replies = h.take()
    if trick.tcp_code is None:
        assert replies == []
    else:
        assert_unreachable(replies, trick.tcp_code, pkt)


@pytest.mark.parametrize("disable_host_loopback", [True, False])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("trick", TRICKS, ids=TRICK_IDS)
def test_udp_to_a_trick_address_reaches_no_host_socket(trick: Trick, fragmented: bool,
                                                       disable_host_loopback: bool) -> None:
    h = Harness(disable_host_loopback=disable_host_loopback)
    h.send(datagram(trick.dst, trick.port, size=3000), fragment_size=1480 if fragmented else None)
    assert h.reaching_calls() == []
    assert len(h.stack.udp) == 0
    # Dropped without a word, as slirp4netns does (nothing listens there, nothing answers).
    assert h.take() == []


@pytest.mark.parametrize("disable_host_loopback", [True, False])
@pytest.mark.parametrize("fragmented", [False, True])
@pytest.mark.parametrize("trick", TRICKS, ids=TRICK_IDS)
def test_ping_to_a_trick_address_reaches_no_host_socket(trick: Trick, fragmented: bool,
                                                        disable_host_loopback: bool) -> None:
    h = Harness(disable_host_loopback=disable_host_loopback)
    pkt = echo(trick.dst, size=3000)
    h.send(pkt, fragment_size=1480 if fragmented else None)
    assert h.reaching_calls() == []
    replies = h.take()
    if trick.dst == DNS:  # the virtual DNS server answers ping itself
        assert [(r.src, r[ICMP].type) for r in replies] == [(DNS, 0)]
    elif trick.ping_prohibited:
        assert_unreachable(replies, 13, pkt)  # communication administratively prohibited
    else:
        assert replies == []


@pytest.mark.parametrize("fragmented", [False, True])
def test_gateway_with_host_loopback_disabled_reaches_no_host_socket(fragmented: bool) -> None:
    h = Harness(disable_host_loopback=True)
    tcp = syn(GATEWAY, 8080)
    tcp[TCP].options = [("NOP", None)] * 16
    h.send(tcp, fragment_size=8 if fragmented else None)
    assert_unreachable(h.take(), icmp.NET_UNREACH, tcp)
    h.send(datagram(GATEWAY, 8080, size=3000), fragment_size=1480 if fragmented else None)
    assert h.take() == []
    assert h.stack.counters.get("drop.udp.policy") == 1
    # Ping is answered by the virtual router itself: no host socket is involved.
    h.send(echo(GATEWAY, size=3000), fragment_size=1480 if fragmented else None)
    assert [(r.src, r[ICMP].type) for r in h.take()] == [(GATEWAY, 0)]
    assert h.reaching_calls() == []


def test_gateway_with_host_loopback_enabled_is_the_only_way_to_loopback() -> None:
    h = Harness()
    h.send(syn(GATEWAY, 8080))
    h.send(syn("127.0.0.1", 8080))
    h.send(datagram(GATEWAY, 8080))
    h.send(datagram("127.0.0.1", 8080))
    [connect] = [c for c in h.reaching_calls() if c[0] == "tcp_connect"]
    assert connect[2] == [("127.0.0.1", 8080)]
    [send] = [c for c in h.reaching_calls() if c[0] == "udp_send"]
    assert send[2] == ("127.0.0.1", 8080)


@pytest.mark.parametrize("checksummed_for", ["header", "route"])
def test_ip_source_route_options_are_not_followed(checksummed_for: str) -> None:
    """A loose source route through 127.0.0.1 is an option the NAT ignores: the host
    socket goes to the header's destination only, never to a hop of the route. (A TCP
    checksum over the route's final destination, as RFC 1122 3.2.1.8 has the sender
    compute it, does not verify against the header's: the SYN is dropped.)"""
    h = Harness(disable_host_loopback=True)
    route = [IPOption_LSRR(routers=["127.0.0.1"])]
    if checksummed_for == "route":
        h.send(syn("198.18.0.1", 80, options=route))  # scapy sums over the final hop
        assert h.reaching_calls() == []
        return
    tcp = _tcp_header("198.18.0.1", 80)
    h.send(IP(src=GUEST, dst="198.18.0.1", proto=6, options=route) / Raw(tcp))
    [connect] = [c for c in h.reaching_calls() if c[0] == "tcp_connect"]
    assert connect[2] == [("198.18.0.1", 80)]


def _tcp_header(dst: str, dport: int) -> bytes:
    """A SYN's 24-byte TCP header (options padded with NOPs), checksummed for ``dst``."""
    pkt = IP(bytes(IP(src=GUEST, dst=dst) / TCP(sport=40000, dport=dport, flags="S", seq=1000,
                                                 options=[("NOP", None)] * 4)))
    return bytes(pkt[TCP])


def _send_fragments(h: Harness, dst: str, pieces: list[tuple[int, bool, bytes]]) -> None:
    for offset, more, data in pieces:
        frag = IP(src=GUEST, dst=dst, id=4242, proto=6, flags="MF" if more else 0,
                  frag=offset // 8) / Raw(data)
        frame = Ether(src=GUEST_MAC, dst=h.our_mac) / frag
        h.stack.receive_frame(memoryview(bytes(frame)), h.now)


@pytest.mark.parametrize("overlap", [False, True])
def test_overlapping_fragments_cannot_swap_the_port_after_the_check(overlap: bool) -> None:
    """RFC 1858's overlap attack: a first fragment with an allowed port (DNS over TCP),
    a second that rewrites it to another port of the DNS address. Overlaps abandon the
    packet, so nothing reaches the host; without the overlap the SYN is forwarded (the
    fragments are sound)."""
    h = Harness(disable_host_loopback=True)
    good, bad = _tcp_header(DNS, 53), _tcp_header(DNS, 8080)
    pieces = [(0, True, good[:8]), (0, True, bad[:8]), (8, False, good[8:])]
    _send_fragments(h, DNS, pieces if overlap else [pieces[0], pieces[2]])
    if overlap:
        assert h.reaching_calls() == []
        assert h.take() == []
    else:
        assert [(c[0], c[2]) for c in h.reaching_calls()] == [("tcp_connect", [UPSTREAM])]


# ---- the DNS address: port 53 only, and only to the configured upstreams -----------------

@pytest.mark.parametrize("disable_host_loopback", [True, False])
def test_dns_address_forwards_port_53_to_the_upstreams_only(disable_host_loopback: bool) -> None:
    h = Harness(disable_host_loopback=disable_host_loopback)
    query = (IP(src=GUEST, dst=DNS) / UDP(sport=40001, dport=53)
             / Raw(bytes.fromhex("1234010000010000000000000474657374000001000" "1")))
    h.send(query)
    h.send(syn(DNS, 53))
    h.send(datagram(DNS, 5353))
    h.send(syn(DNS, 5353))
    reaching = h.reaching_calls()
    assert [(c[0], c[2]) for c in reaching] == [("dns_send", UPSTREAM),
                                                ("tcp_connect", [UPSTREAM])]


def test_dns_address_with_dns_disabled_is_an_outside_address_as_in_slirp4netns() -> None:
    # libslirp forwards it to the host's network then: never to the upstreams or loopback.
    h = Harness(disable_dns=True, disable_host_loopback=True)
    h.send(datagram(DNS, 53))
    h.send(syn(DNS, 53))
    reaching = [c for c in h.reaching_calls() if c[0] != "udp_open"]
    assert [(c[0], c[2]) for c in reaching] == [("udp_send", (DNS, 53)),
                                                ("tcp_connect", [(DNS, 53)])]


# ---- the policy itself, over every address -------------------------------------------------

ipv4_addresses = st.integers(min_value=0, max_value=2**32 - 1).map(
    lambda n: ipaddress.IPv4Address(n))


@given(addr=ipv4_addresses, port=st.integers(min_value=1, max_value=65535),
       disable_host_loopback=st.booleans())
def test_no_destination_maps_to_loopback_except_the_gateway_and_dns(
        addr: ipaddress.IPv4Address, port: int, disable_host_loopback: bool) -> None:
    h = Harness(disable_host_loopback=disable_host_loopback)
    targets = h.stack.host_targets(addr.packed, port)
    text = str(addr)
    if text == GATEWAY:
        assert targets == (None if disable_host_loopback else [("127.0.0.1", port)])
    elif text == DNS:
        assert targets == ([UPSTREAM] if port == 53 else None)
    elif (addr in ipaddress.IPv4Network("10.0.2.0/24") or addr.is_loopback or addr.is_multicast
          or addr in ipaddress.IPv4Network("0.0.0.0/8") or int(addr) >= 0xE0000000):
        assert targets is None
    else:
        # Everything else is itself: never rewritten toward the host.
        assert targets == [(text, port)]
