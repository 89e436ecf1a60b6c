"""Link: the frames its send paths put on the wire, the MTU guard, and its counters.

Frames are compared byte for byte with literals laid out by hand, so a change in the
link's framing shows up as a byte difference.
"""

from __future__ import annotations

import pytest

from pyslirp.stack.config import NetConfig
from pyslirp.wire import ethernet, ipv4, vnet
from pyslirp.wire.checksum import verify
from tests.stack.fakes import GUEST_MAC, make_link

OUR_MAC = bytes.fromhex("52550a000202")  # libslirp's convention: 52:55 + 10.0.2.2
GATEWAY = bytes([10, 0, 2, 2])
GUEST = bytes([10, 0, 2, 100])

# Ethernet to the guest (02:00:00:00:00:64) from 52:55:0a:00:02:02, IPv4.
ETH_TO_GUEST = bytes.fromhex("020000000064" "52550a000202" "0800")
# IPv4 10.0.2.2 -> 10.0.2.100, UDP, 4 bytes of payload, ID 1, DF, TTL 64 (as scapy lays it out).
IP_TO_GUEST = bytes.fromhex("45000018" "00014000" "4011" "226f" "0a000202" "0a000264")
L4 = b"\x01\x02\x03\x04"


def test_send_ipv4_frames_the_l4_part_for_the_guest() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=False))
    assert link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4) is True
    [frame] = sink.take()
    assert frame == ETH_TO_GUEST + IP_TO_GUEST + L4
    assert verify(frame[14:34])
    assert link.counters == {}


def test_send_ipv4_keeps_the_l4_part_unjoined() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=False))
    link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4)
    # Two parts: the headers built in one buffer, the L4 part as the engine gave it.
    assert sink.part_counts == [2]


def test_send_ipv4_puts_a_plain_vnet_header_first_when_the_link_has_one() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=True))
    link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4)
    [frame] = sink.take()
    assert frame == bytes(vnet.HEADER_LEN) + ETH_TO_GUEST + IP_TO_GUEST + L4


def test_send_ipv4_takes_mac_ttl_flags_and_ident_when_given() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=False))
    other = bytes.fromhex("0200000000ff")
    link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_ICMP, L4, dst_mac=other, ttl=1,
                   flags=ipv4.FLAG_MF | 3, ident=0xBEEF)
    [frame] = sink.take()
    assert frame[:6] == other
    packet = ipv4.Ipv4Packet(memoryview(frame[14:]))  # checks the header checksum
    assert (packet.ttl, packet.flags_frag, packet.ident, packet.proto) == (
        1, ipv4.FLAG_MF | 3, 0xBEEF, ipv4.PROTO_ICMP)
    assert packet.frag_offset == 24 and packet.more_fragments
    # An explicit ident does not use up one of the link's.
    assert link.next_ip_id() == 1


def test_ip_ids_count_up_per_packet_and_wrap() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=False))
    for _ in range(3):
        link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4)
    assert [ipv4.Ipv4Packet(memoryview(f[14:])).ident for f in sink.take()] == [1, 2, 3]
    link._ip_ident = 0xFFFE
    assert [link.next_ip_id() for _ in range(3)] == [0xFFFF, 0, 1]


def test_send_ipv4_without_a_guest_mac_sends_nothing_and_counts() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=False))
    link.guest_mac = None
    assert link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4) is False
    assert sink.take() == []
    assert link.counters == {"drop.tx.no_guest_mac": 1}
    # ... unless the caller names the MAC itself (a DHCP broadcast, say).
    assert link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, L4, dst_mac=ethernet.BROADCAST)
    assert sink.take()[0][:6] == ethernet.BROADCAST


def test_the_guest_mac_comes_from_the_configuration_until_learned() -> None:
    link, _ = make_link(NetConfig(vnet_hdr=False, guest_mac=GUEST_MAC), guest_mac=GUEST_MAC)
    assert link.guest_mac == GUEST_MAC
    assert make_link(NetConfig(), guest_mac=GUEST_MAC)[0].our_mac == OUR_MAC


@pytest.mark.parametrize("vnet_hdr", [False, True])
@pytest.mark.parametrize("mtu", [576, 1500, 9000])
def test_send_ipv4_drops_packets_over_the_mtu(mtu: int, vnet_hdr: bool) -> None:
    link, sink = make_link(NetConfig(vnet_hdr=vnet_hdr, mtu=mtu))
    assert link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, bytes(mtu - 20)) is True
    [frame] = sink.take()
    assert len(frame) == (vnet.HEADER_LEN if vnet_hdr else 0) + 14 + mtu
    assert link.send_ipv4(GATEWAY, GUEST, ipv4.PROTO_UDP, bytes(mtu - 19)) is False
    assert sink.take() == []
    assert link.counters == {"drop.tx.over_mtu": 1}


@pytest.mark.parametrize("vnet_hdr", [False, True])
def test_send_ethernet_frames_the_payload_and_drops_it_over_the_mtu(vnet_hdr: bool) -> None:
    link, sink = make_link(NetConfig(vnet_hdr=vnet_hdr, mtu=576))
    link.send_ethernet(GUEST_MAC, ethernet.ETHERTYPE_ARP, bytes(576))
    [frame] = sink.take()
    head = (bytes(vnet.HEADER_LEN) if vnet_hdr else b"") + GUEST_MAC + OUR_MAC + b"\x08\x06"
    assert frame == head + bytes(576)
    link.send_ethernet(GUEST_MAC, ethernet.ETHERTYPE_ARP, bytes(577))
    assert sink.take() == []
    assert link.counters == {"drop.tx.over_mtu": 1}


def test_send_frame_passes_the_parts_through_as_given() -> None:
    link, sink = make_link(NetConfig(vnet_hdr=True, mtu=576))
    parts = [b"\x00" * 12, b"head", bytearray(b"x" * 2000)]  # the TCP engine sizes its own
    link.send_frame(parts)
    assert sink.frames == [b"".join(parts)] and sink.part_counts == [3]
    assert link.counters == {}


def test_counters_add_up_by_name() -> None:
    link, _ = make_link()
    link.count("drop.a")
    link.count("drop.a", 4)
    link.count("drop.b")
    assert link.counters == {"drop.a": 5, "drop.b": 1}
    assert link.counters["never.counted"] == 0


@pytest.mark.parametrize(("vnet_hdr", "offload", "offloaded"), [
    (True, True, True), (True, False, False), (False, True, False), (False, False, False)])
def test_offload_needs_a_vnet_header(vnet_hdr: bool, offload: bool, offloaded: bool) -> None:
    link, _ = make_link(NetConfig(vnet_hdr=vnet_hdr, offload=offload))
    assert (link.vnet_hdr, link.offload) == (vnet_hdr, offloaded)
