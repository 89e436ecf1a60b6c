"""UDP super-frames from the guest (vnet GSO_UDP_L4, "USO"): a guest socket with
UDP_SEGMENT hands its kernel several datagrams at once, and with TUN_F_USO4/6 on
the TAP the kernel hands them to us uncut. Each must reach the host as the
datagram the guest application wrote: never joined into one, never cut elsewhere.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from pyslirp.wire import ethernet, vnet
from tests.stack.fakes import StackHarness

GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
GUEST6 = "fd00::100"
GATEWAY6 = "fd00::2"


def super_frame(h: StackHarness, packet: bytes, gso_size: int, v6: bool = False) -> bytes:
    """A USO frame as the guest's kernel writes it: NEEDS_CSUM, GSO_UDP_L4, gso_size."""
    l3 = 40 if v6 else 20
    header = vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_UDP_L4, 14 + l3 + 8, gso_size,
                        14 + l3, 6)
    ethertype = ethernet.ETHERTYPE_IPV6 if v6 else ethernet.ETHERTYPE_IPV4
    plain = h.frame(ethertype, packet)
    return header + plain[vnet.HEADER_LEN:]


def datagrams_sent(h: StackHarness) -> list[tuple[tuple[str, int], bytes]]:
    return [(c[2], c[3]) for c in h.host.calls if c[0] == "udp_send"]


@pytest.mark.parametrize("sizes", [[1000] * 4, [1000] * 3 + [17], [1200] * 40 + [1]])
def test_each_segment_reaches_the_host_as_its_own_datagram(sizes: list[int]) -> None:
    h = StackHarness(vnet_hdr=True, offload=True)
    parts = [bytes([i & 0xFF]) * n for i, n in enumerate(sizes)]
    packet = bytes(IP(src=GUEST, dst=GATEWAY) / UDP(sport=41000, dport=7000)
                   / b"".join(parts))
    h.send_frame(super_frame(h, packet, sizes[0]))
    assert datagrams_sent(h) == [(("127.0.0.1", 7000), p) for p in parts]


def test_ipv6_segments_are_kept_apart_too() -> None:
    h = StackHarness(vnet_hdr=True, offload=True, enable_ipv6=True)
    parts = [b"a" * 1300, b"b" * 1300, b"c" * 5]
    packet = bytes(IPv6(src=GUEST6, dst=GATEWAY6) / UDP(sport=41000, dport=7000)
                   / b"".join(parts))
    h.send_frame(super_frame(h, packet, 1300, v6=True))
    assert datagrams_sent(h) == [(("::1", 7000), p) for p in parts]


def test_segment_as_large_as_the_payload_is_one_datagram() -> None:
    h = StackHarness(vnet_hdr=True, offload=True)
    packet = bytes(IP(src=GUEST, dst=GATEWAY) / UDP(sport=41000, dport=7000) / (b"z" * 800))
    h.send_frame(super_frame(h, packet, 1400))
    assert datagrams_sent(h) == [(("127.0.0.1", 7000), b"z" * 800)]


def test_zero_segment_size_is_malformed_not_one_big_datagram() -> None:
    h = StackHarness(vnet_hdr=True, offload=True)
    packet = bytes(IP(src=GUEST, dst=GATEWAY) / UDP(sport=41000, dport=7000) / (b"z" * 3000))
    h.send_frame(super_frame(h, packet, 0))
    assert datagrams_sent(h) == []
    assert h.counters.get("drop.malformed.vnet") == 1


@pytest.mark.parametrize("dst,dport", [("10.0.2.3", 53), ("10.0.2.255", 9), (GATEWAY, 67)])
def test_segmented_sends_to_our_own_services_are_dropped_and_counted(dst: str,
                                                                     dport: int) -> None:
    h = StackHarness(vnet_hdr=True, offload=True)
    packet = bytes(IP(src=GUEST, dst=dst) / UDP(sport=41000, dport=dport) / (b"q" * 200))
    h.send_frame(super_frame(h, packet, 100))
    assert datagrams_sent(h) == []
    assert h.counters.get("drop.udp.segmented_local") == 1
