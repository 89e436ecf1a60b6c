"""The guest's datagrams held for the end of a batch of frames and sent as runs
(UdpEngine.batching, one segmented host send per run of equal-size datagrams of
one flow to one target): whatever the mix, the host's peers get exactly the
datagrams the guest sent, each whole, in the guest's order."""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import IP, UDP

from pyslirp.wire import ethernet
from tests.stack import fakes

GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"


class RawHost(fakes.FakeHost):
    """Records each udp_send call as made (``sends``) besides the per-datagram record."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[tuple[Any, int]] = []

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Any, segment: int = 0) -> None:
        self.sends.append((dst, segment))
        super().udp_send(flow, dst, data, segment)


def _batch(h: fakes.StackHarness, datagrams: list[tuple[int, int, bytes]]) -> None:
    """One batch of frames from the guest ((sport, dport, payload) each), then flush."""
    for sport, dport, payload in datagrams:
        pkt = IP(src=GUEST, dst=GATEWAY) / UDP(sport=sport, dport=dport) / payload
        h.stack.receive_frame(memoryview(h.frame(ethernet.ETHERTYPE_IPV4, bytes(pkt))), h.now)
    h.stack.flush(h.now)


def _received(h: fakes.StackHarness) -> list[tuple[int, bytes]]:
    return [(c[2][1], c[3]) for c in h.host.calls if c[0] == "udp_send"]


def _harness() -> tuple[fakes.StackHarness, RawHost]:
    host = RawHost()
    return fakes.StackHarness(host=host), host


def test_a_run_of_equal_datagrams_is_one_segmented_send() -> None:
    h, host = _harness()
    _batch(h, [(41000, 7000, b"first")])   # opens the flow
    host.sends.clear()
    data = [bytes([i]) * 1400 for i in range(20)]
    _batch(h, [(41000, 7000, d) for d in data])
    assert host.sends == [(("127.0.0.1", 7000), 1400)]
    assert _received(h)[1:] == [(7000, d) for d in data]


def test_sizes_destinations_and_flows_mixed_arrive_whole_and_in_order() -> None:
    h, host = _harness()
    mix = []
    for i in range(300):
        size = (1400, 1400, 1400, 500, 0, 1400, 7, 1200, 1200)[i % 9]
        dport = 7000 + (i // 40) % 3          # runs to one target, then another
        sport = 41000 if i % 50 else 42000    # now and then another socket
        mix.append((sport, dport, bytes([i & 0xFF]) * size))
    _batch(h, mix)
    sent = _received(h)
    for sport in (41000, 42000):
        mine = [(d, p) for s, d, p in mix if s == sport]
        flow = h.stack.udp.flows[(bytes([10, 0, 2, 100]), sport)]
        got = [(c[2][1], c[3]) for c in h.host.calls if c[0] == "udp_send" and c[1] is flow]
        assert got == mine
    assert len(sent) == len(mix)
    assert len(host.sends) < len(mix) // 2, "runs were formed"


def test_a_run_never_exceeds_one_ip_packet_or_64_datagrams() -> None:
    h, host = _harness()
    _batch(h, [(41000, 7000, b"x" * 1400)] * 100 + [(41000, 7000, b"y" * 10)] * 100)
    segments = {}
    for call in h.host.calls:
        if call[0] == "udp_send":
            segments.setdefault(len(call[3]), 0)
            segments[len(call[3])] += 1
    assert segments == {1400: 100, 10: 100}
    assert len(host.sends) == 3 + 2   # 46 + 46 + 8 of 1400, 64 + 36 of 10


def test_a_flow_closed_before_the_flush_sends_nothing() -> None:
    h, _ = _harness()
    pkt = IP(src=GUEST, dst=GATEWAY) / UDP(sport=41000, dport=7000) / b"late"
    h.stack.receive_frame(memoryview(h.frame(ethernet.ETHERTYPE_IPV4, bytes(pkt))), h.now)
    h.stack.udp.close_all()
    h.stack.flush(h.now)
    assert _received(h) == []
