"""Stack: which engine each guest frame reaches, ARP, what the stack learns of the guest,
and the address policy every engine shares.

The demultiplexing tests replace the engines' entry points with recorders (the engines
themselves have their own tests); the ARP and policy tests use the real stack.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet, Raw

from pyslirp.wire import arp, ethernet, vnet
from tests.stack.fakes import GUEST_MAC, StackHarness

GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
REMOTE = "198.18.0.1"
UPSTREAM = ("127.0.0.53", 53)


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


class Recorder:
    """Stands for an engine: notes each call of its entry point in ``reached``."""

    def __init__(self, name: str, reached: list[tuple[Any, ...]]) -> None:
        self.name = name
        self.reached = reached

    def handle(self, *args: Any) -> None:
        self.reached.append((self.name, *args))

    handle_query = handle
    #: As UdpEngine's: no datagrams held for the batch's end.
    pending = None
    #: As TcpEngine's: no SYN flood being shed.
    syn_shed_until = 0.0

    def flush(self, now: float) -> None:
        pass


class Demux(StackHarness):
    """A stack whose engines only record what reaches them: ``(engine, *arguments)``."""

    def __init__(self, **cfg: Any) -> None:
        cfg.setdefault("dns_upstreams", [UPSTREAM])
        super().__init__(**cfg)
        self.reached: list[tuple[Any, ...]] = []
        stack: Any = self.stack
        for name in ("tcp", "udp", "icmp", "dhcp", "dns"):
            setattr(stack, name, Recorder(name, self.reached))

    def engines(self) -> list[str]:
        return [r[0] for r in self.reached]

    def send(self, pkt: Packet, vnet_flags: int = 0, src_mac: bytes = GUEST_MAC) -> None:
        frame = ethernet.header(self.link.our_mac, src_mac, ethernet.ETHERTYPE_IPV4) + bytes(pkt)
        if self.config.vnet_hdr:
            frame = vnet.build(flags=vnet_flags) + frame
        self.send_frame(frame)


def udp(dst: str, dport: int, src: str = GUEST, sport: int = 40000) -> Packet:
    return IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(b"data")


# ---- demultiplexing ---------------------------------------------------------------------

@pytest.mark.parametrize(("pkt", "engine"), [
    (IP(src=GUEST, dst=REMOTE) / TCP(sport=40000, dport=80, flags="S"), "tcp"),
    (udp(REMOTE, 7), "udp"),
    (IP(src=GUEST, dst=REMOTE) / ICMP(type=8), "icmp"),
], ids=["tcp", "udp", "icmp"])
def test_each_ip_protocol_reaches_its_engine(pkt: Packet, engine: str) -> None:
    h = Demux()
    h.send(pkt)
    assert h.engines() == [engine]
    ip, now, trusted = h.reached[0][1:]
    assert bytes(ip.buf) == bytes(pkt)
    assert (now, trusted) == (h.now, False)


def test_other_ip_protocols_are_dropped_and_counted() -> None:
    h = Demux()
    h.send(IP(src=GUEST, dst=REMOTE, proto=47) / Raw(b"gre"))
    assert h.reached == [] and h.replies() == []
    assert h.counters["drop.ip_proto"] == 1


@pytest.mark.parametrize("ethertype", [ethernet.ETHERTYPE_IPV6, 0x88CC, 0x8100])
def test_other_ethertypes_are_dropped_and_counted(ethertype: int) -> None:
    h = Demux()
    h.send_frame(h.frame(ethertype, bytes(40)))
    assert h.reached == [] and h.replies() == []
    assert h.counters["drop.ethertype"] == 1


@pytest.mark.parametrize("dst", ["255.255.255.255", "10.0.2.255", GATEWAY])
def test_udp_to_port_67_of_the_server_or_broadcast_reaches_dhcp(dst: str) -> None:
    h = Demux()
    h.send(udp(dst, 67, src="0.0.0.0", sport=68), src_mac=bytes.fromhex("66696895ca9c"))
    [(engine, src_mac, ip, datagram, now)] = h.reached
    assert engine == "dhcp" and src_mac == bytes.fromhex("66696895ca9c")
    assert (datagram.src_port, datagram.dst_port, bytes(datagram.payload)) == (68, 67, b"data")
    assert bytes(ip.dst) == ip4(dst) and now == h.now


def test_udp_to_port_67_elsewhere_is_nat_traffic() -> None:
    h = Demux()
    h.send(udp(REMOTE, 67))
    assert h.engines() == ["udp"]


def test_other_broadcast_udp_is_dropped_and_counted() -> None:
    h = Demux()
    h.send(udp("255.255.255.255", 137))
    h.send(udp("10.0.2.255", 5353))
    assert h.reached == []
    assert h.counters["drop.udp.broadcast"] == 2


def test_the_dns_address_port_53_reaches_the_forwarder() -> None:
    h = Demux()
    h.send(udp(DNS, 53))
    [(engine, ip, datagram, now)] = h.reached
    assert engine == "dns" and bytes(ip.dst) == ip4(DNS)
    assert (datagram.dst_port, bytes(datagram.payload), now) == (53, b"data", h.now)


@pytest.mark.parametrize(("dst", "dport", "cfg"), [
    (DNS, 5353, {}),
    (REMOTE, 53, {}),
    (GATEWAY, 53, {}),
    (DNS, 53, {"disable_dns": True}),
], ids=["dns-other-port", "remote-53", "gateway-53", "dns-disabled"])
def test_other_port_53_traffic_is_nat_traffic(dst: str, dport: int, cfg: dict[str, Any]
                                              ) -> None:
    h = Demux(**cfg)
    h.send(udp(dst, dport))
    assert h.engines() == ["udp"]


def test_dns_over_tcp_goes_to_the_tcp_engine() -> None:
    h = Demux()
    h.send(IP(src=GUEST, dst=DNS) / TCP(sport=40000, dport=53, flags="S"))
    assert h.engines() == ["tcp"]


@pytest.mark.parametrize(("flags", "trusted"), [
    (0, False), (vnet.F_NEEDS_CSUM, True), (vnet.F_DATA_VALID, True)])
def test_checksums_are_trusted_only_when_the_vnet_header_says_so(flags: int,
                                                                 trusted: bool) -> None:
    h = Demux(vnet_hdr=True)
    h.send(udp(REMOTE, 7), vnet_flags=flags)
    h.send(IP(src=GUEST, dst=REMOTE) / TCP(sport=40000, dport=80, flags="S"), vnet_flags=flags)
    assert [(r[0], r[3]) for r in h.reached] == [("udp", trusted), ("tcp", trusted)]


def test_fragments_are_reassembled_before_the_engine_sees_them() -> None:
    h = Demux(vnet_hdr=True)
    whole = IP(src=GUEST, dst=REMOTE, id=99) / UDP(sport=40000, dport=7) / Raw(bytes(3000))
    pieces = fragment(whole, fragsize=1480)
    assert len(pieces) == 3
    for piece in pieces[:-1]:
        h.send(piece, vnet_flags=vnet.F_DATA_VALID)
        assert h.reached == [] and len(h.stack.frag) == 1
    h.send(pieces[-1], vnet_flags=vnet.F_DATA_VALID)
    [(engine, ip, _now, trusted)] = h.reached
    assert engine == "udp" and bytes(ip.buf) == bytes(whole)
    # The header flags covered the fragments, not the reassembled datagram.
    assert trusted is False
    assert len(h.stack.frag) == 0


@pytest.mark.parametrize("frame", [b"", bytes(13)], ids=["empty", "13-bytes"])
def test_frames_shorter_than_ethernet_are_counted_as_malformed(frame: bytes) -> None:
    h = Demux()
    h.send_frame(frame)
    assert h.counters == {"drop.malformed.ethernet": 1}


def test_frames_shorter_than_the_vnet_header_are_counted_as_malformed() -> None:
    h = Demux(vnet_hdr=True)
    h.send_frame(bytes(vnet.HEADER_LEN - 1))
    assert h.counters == {"drop.malformed.vnet": 1}


# ---- what the stack learns of the guest ----------------------------------------------------

def test_guest_mac_and_address_are_learned_from_its_frames() -> None:
    h = Demux()
    assert h.link.guest_mac is None and h.stack.guest_ip is None
    h.send(udp(REMOTE, 7))
    assert h.link.guest_mac == GUEST_MAC and h.stack.guest_ip == ip4(GUEST)
    moved = bytes.fromhex("020000000099")
    h.send(udp(REMOTE, 7, src="10.0.2.15"), src_mac=moved)
    assert h.link.guest_mac == moved and h.stack.guest_ip == ip4("10.0.2.15")


def test_group_source_macs_and_foreign_source_addresses_are_not_learned() -> None:
    h = Demux()
    h.send(udp(REMOTE, 7))
    h.send(udp(REMOTE, 7), src_mac=ethernet.BROADCAST)
    h.send(udp(REMOTE, 7), src_mac=bytes.fromhex("01005e000001"))  # IPv4 multicast
    h.send(udp(REMOTE, 7, src="192.0.2.9"))
    assert h.link.guest_mac == GUEST_MAC and h.stack.guest_ip == ip4(GUEST)


# ---- ARP ---------------------------------------------------------------------------------

def arp_frame(h: StackHarness, op: int, target: str, sender: str = GUEST,
              src_mac: bytes = GUEST_MAC) -> bytes:
    body = arp.build(op, src_mac, ip4(sender), bytes(6), ip4(target))
    return h.frame(ethernet.ETHERTYPE_ARP, body, src_mac,
                   dst_mac=ethernet.BROADCAST)


@pytest.mark.parametrize("vnet_hdr", [False, True])
@pytest.mark.parametrize("target", [GATEWAY, DNS])
def test_arp_requests_for_the_gateway_and_dns_are_answered(target: str, vnet_hdr: bool
                                                           ) -> None:
    h = StackHarness(vnet_hdr=vnet_hdr)
    h.send_frame(arp_frame(h, arp.OP_REQUEST, target))
    [reply] = h.replies()
    eth = Ether(reply)
    our_mac = ethernet.mac_to_str(h.config.our_mac)
    guest_mac = ethernet.mac_to_str(GUEST_MAC)
    assert (eth.dst, eth.src, eth.type) == (guest_mac, our_mac, ethernet.ETHERTYPE_ARP)
    a = eth[ARP]
    # slirp4netns's (libslirp's) answer: 52:55 and the address asked for
    their_mac = "52:55:" + ":".join(f"{int(b):02x}" for b in target.split("."))
    assert (a.op, a.hwsrc, a.psrc) == (arp.OP_REPLY, their_mac, target)
    assert (a.hwdst, a.pdst) == (guest_mac, GUEST)


@pytest.mark.parametrize("target", [GUEST, "10.0.2.77", "10.0.2.255", REMOTE, "127.0.0.1"])
def test_arp_requests_for_other_addresses_are_not_answered(target: str) -> None:
    h = StackHarness()
    h.send_frame(arp_frame(h, arp.OP_REQUEST, target))
    assert h.replies() == []
    assert h.counters == {}


def test_arp_replies_get_no_answer_but_teach_the_guest_mac() -> None:
    h = StackHarness()
    h.send_frame(arp_frame(h, arp.OP_REPLY, GATEWAY))
    assert h.replies() == []
    assert h.link.guest_mac == GUEST_MAC


def test_non_ethernet_ipv4_arp_is_counted_as_malformed() -> None:
    h = StackHarness()
    body = bytearray(arp.build(arp.OP_REQUEST, GUEST_MAC, ip4(GUEST), bytes(6), ip4(GATEWAY)))
    body[0:2] = (6).to_bytes(2, "big")  # htype IEEE 802, not Ethernet
    h.send_frame(h.frame(ethernet.ETHERTYPE_ARP, bytes(body)))
    assert h.replies() == []
    assert h.counters == {"drop.malformed.arp": 1}


def test_resolve_guest_broadcasts_a_request_from_the_gateway() -> None:
    h = StackHarness()
    h.stack.resolve_guest(ip4("10.0.2.15"))
    [frame] = h.replies()
    eth = Ether(frame)
    assert eth.dst == "ff:ff:ff:ff:ff:ff" and eth.type == ethernet.ETHERTYPE_ARP
    a = eth[ARP]
    assert (a.op, a.hwsrc, a.psrc) == (arp.OP_REQUEST, ethernet.mac_to_str(h.config.our_mac),
                                       GATEWAY)
    assert (a.hwdst, a.pdst) == ("00:00:00:00:00:00", "10.0.2.15")


# ---- the address policy -------------------------------------------------------------------

LOOPBACK_OFF = {"disable_host_loopback": True}
DNS_OFF = {"disable_dns": True}


@pytest.mark.parametrize(("dst", "port", "cfg", "targets"), [
    (GATEWAY, 8080, {}, [("127.0.0.1", 8080)]),
    (GATEWAY, 8080, LOOPBACK_OFF, None),
    (DNS, 53, {}, [UPSTREAM]),
    (DNS, 53, LOOPBACK_OFF, [UPSTREAM]),
    (DNS, 53, DNS_OFF, [(DNS, 53)]),  # as slirp4netns: an outside address then
    (DNS, 80, DNS_OFF, [(DNS, 80)]),
    (DNS, 53, {"dns_upstreams": []}, None),
    (DNS, 80, {}, None),
    (GUEST, 80, {}, None),
    ("10.0.2.0", 80, {}, None),
    ("10.0.2.77", 80, {}, None),
    ("10.0.2.255", 80, {}, None),
    ("127.0.0.1", 80, {}, None),
    ("127.9.9.9", 80, {}, None),
    ("0.0.0.0", 80, {}, None),
    ("0.1.2.3", 80, {}, None),
    ("224.0.0.1", 80, {}, None),
    ("239.255.255.250", 1900, {}, None),
    ("255.255.255.255", 80, {}, None),
    (REMOTE, 443, {}, [(REMOTE, 443)]),
    (REMOTE, 443, LOOPBACK_OFF, [(REMOTE, 443)]),
    ("10.0.3.1", 22, {}, [("10.0.3.1", 22)]),
    ("223.255.255.254", 80, {}, [("223.255.255.254", 80)]),
])
def test_host_targets(dst: str, port: int, cfg: dict[str, Any],
                      targets: list[tuple[str, int]] | None) -> None:
    cfg = {"dns_upstreams": [UPSTREAM], **cfg}
    h = StackHarness(**cfg)
    assert h.stack.host_targets(ip4(dst), port) == targets


def test_host_targets_follows_the_configured_network() -> None:
    h = StackHarness(network=ipaddress.IPv4Network("192.168.77.0/24"),
                     dns_upstreams=[UPSTREAM])
    assert h.stack.host_targets(ip4("192.168.77.2"), 80) == [("127.0.0.1", 80)]
    assert h.stack.host_targets(ip4("192.168.77.3"), 53) == [UPSTREAM]
    assert h.stack.host_targets(ip4("192.168.77.50"), 80) is None
    assert h.stack.host_targets(ip4(GATEWAY), 80) == [(GATEWAY, 80)]


def test_new_dns_upstreams_are_used_from_then_on() -> None:
    h = StackHarness(dns_upstreams=[UPSTREAM])
    h.stack.set_dns_upstreams([("127.0.0.11", 53), ("127.0.0.12", 5353)])
    assert h.stack.host_targets(ip4(DNS), 53) == [("127.0.0.11", 53), ("127.0.0.12", 5353)]
