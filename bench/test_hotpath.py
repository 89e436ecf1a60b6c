"""pytest-benchmark microbenchmarks of the per-frame work (issue 5).

Run: ``.venv/bin/python -m pytest bench/test_hotpath.py --benchmark-enable``.
Compare against a baseline: add ``--benchmark-save=base`` once, then
``--benchmark-compare`` (see bench/README.md). The regular test suite runs these
with benchmarking disabled (each body once), so they also stay correct.
"""

from __future__ import annotations

import os
from typing import Any

from pyslirp.stack.tcp import TcpFlow
from pyslirp.wire import checksum, ethernet, ipv4, vnet
from pyslirp.wire import tcp as wtcp
from tests.hotpath import SUPER_PAYLOAD, Rig


def test_parse_64k_tso_frame(benchmark: Any) -> None:
    """vnet + Ethernet + IPv4 + TCP views over a 64 KB super-frame."""
    rig = Rig()
    frame = memoryview(rig.upload_frame())

    def parse() -> int:
        eth = ethernet.EthernetFrame(frame[vnet.HEADER_LEN:])
        ip = ipv4.Ipv4Packet(eth.payload)
        seg = wtcp.TcpSegment(ip.payload)
        return len(seg.payload)

    assert benchmark(parse) == SUPER_PAYLOAD


def test_tcp_receive_in_order_segment(benchmark: Any) -> None:
    """A whole 64 KB frame from the guest: demux, TCP, write to the host, ACK."""
    rig = Rig()
    frames = iter([rig.upload_frame() for _ in range(20000)])
    benchmark.pedantic(lambda: rig.upload(next(frames)), rounds=2000, iterations=1)
    assert rig.flow.state == "ESTABLISHED"


def test_build_gso_frame(benchmark: Any) -> None:
    """64 KB of host data out to the guest as one GSO super-frame, and its ACK back."""
    rig = Rig()

    def round_trip() -> None:
        rig.host_data()
        rig.receive(rig.ack_frame())

    for _ in range(5):  # past slow start
        round_trip()
    benchmark(round_trip)
    assert sum(len(p) for p in rig.sink.last[1:]) == SUPER_PAYLOAD


def test_checksum_64k(benchmark: Any) -> None:
    data = os.urandom(65536)
    result = benchmark(checksum.checksum, data)
    assert 0 < result <= 0xFFFF


def test_checksum_1500(benchmark: Any) -> None:
    data = os.urandom(1500)
    result = benchmark(checksum.checksum, data)
    assert 0 < result <= 0xFFFF


def test_flow_lookup(benchmark: Any) -> None:
    """The flow table lookup with 1,000 flows present."""
    rig = Rig()
    flows = rig.stack.tcp.flows
    key = next(iter(flows))
    for i in range(1000):
        flows[(key[0], 20000 + i, key[2], key[3])] = rig.flow
    assert isinstance(benchmark(flows.get, key), TcpFlow)
