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


# ---- host -> guest: runs of a host peer's datagrams as USO super-frames ---------------

def _flow_with_reply_path(h: StackHarness) -> object:
    packet = bytes(IP(src=GUEST, dst=GATEWAY) / UDP(sport=41000, dport=7000) / b"hi")
    h.send_frame(h.frame(ethernet.ETHERTYPE_IPV4, packet))
    h.link.guest_mac = bytes.fromhex("020000000064")
    return h.stack.udp.flows[(bytes([10, 0, 2, 100]), 41000)]


def _cut(frame: bytes) -> list[bytes]:
    """What the guest's kernel makes of a frame: a USO one cut at gso_size."""
    _flags, gso_type, _hl, gso_size, _cs, _co, _n = vnet.unpack(frame)
    pkt = IP(frame[vnet.HEADER_LEN + 14:])
    payload = bytes(pkt[UDP].payload)
    assert pkt[UDP].len == 8 + len(payload) and pkt.len == 28 + len(payload)
    if gso_type == vnet.GSO_NONE:
        return [payload]
    assert gso_type == vnet.GSO_UDP_L4
    return [payload[i:i + gso_size] for i in range(0, len(payload), gso_size)]


@pytest.mark.parametrize("uso", [True, False])
def test_a_run_of_host_datagrams_reaches_the_guest_as_those_datagrams(uso: bool) -> None:
    h = StackHarness(vnet_hdr=True, offload=True, uso=uso)
    flow = _flow_with_reply_path(h)
    h.frames.clear()
    run = [bytes([i]) * 1400 for i in range(60)] + [b"end"]
    h.stack.udp.host_datagrams(flow, "127.0.0.1", 7000, run, h.now)
    frames = list(h.frames)
    got = [d for f in frames for d in _cut(f)]
    assert got == run
    # With USO: 46 + 15 datagrams (one IPv4 packet each), not 61 frames.
    assert len(frames) == (2 if uso else len(run))
    assert h.counters.get("udp.segmented_to_guest", 0) == (2 if uso else 0)
