"""New-flow admission (pyslirp/stack/admission.py): floods cost no host syscall past
the token bucket, normal bursts and known services are untouched."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from pyslirp.stack.admission import KnownPeers, TokenBucket
from pyslirp.stack.config import ConfigError, NetConfig
from pyslirp.stack.tcp import TcpEngine
from tests.stack import test_tcp, test_udp
from tests.stack.test_tcp import S


class TcpHarness(test_tcp.Harness):
    """The TCP engine rig with the admission settings of ``NetConfig`` given."""

    def __init__(self, **net: Any) -> None:
        super().__init__()
        self.config = NetConfig(**net)
        self.engine = TcpEngine(self.config, self.link, self.host, self.timers,
                                lambda ip, port: [("127.0.0.1", port)])


def test_syns_past_the_burst_are_dropped_before_any_host_call() -> None:
    h = TcpHarness(new_flow_rate=10, new_flow_burst=20)
    for port in range(1000, 1100):
        h.send(S, sport=port, dport=port)
    assert h.host.names().count("tcp_connect") == 20
    assert h.link.counters["tcp.drop.new_flow_rate"] == 80
    assert h.out() == []  # dropped silently: no RST to make the flood cheaper for the guest
    h.clock.advance(1.0)  # ten more tokens
    for port in range(2000, 2100):
        h.send(S, sport=port, dport=port)
    assert h.host.names().count("tcp_connect") == 30


def test_the_default_admits_a_burst_of_thousands_of_connections() -> None:
    h = TcpHarness()
    for i in range(4000):  # one instant: bench's connect workload is ~5,000/s for < 1 s
        h.send(S, sport=10000 + i, dport=20000 + i, flush=False)
        flow = h.host.calls[-1][1]
        flow.host_connect_failed(errno.ECONNREFUSED, h.clock.now)
    assert h.host.names().count("tcp_connect") == 4000
    assert "tcp.drop.new_flow_rate" not in h.link.counters


def test_a_destination_that_accepted_a_connection_is_reachable_during_a_flood() -> None:
    h = TcpHarness(new_flow_rate=1, new_flow_burst=1)
    flow, _ = h.connect()  # the one token: port 80 accepted, so it is known now
    for port in range(3000, 3200):  # the flood: closed ports, no tokens left
        h.send(S, sport=port, dport=port)
    assert h.link.counters["tcp.drop.new_flow_rate"] == 200
    before = h.host.names().count("tcp_connect")
    h.send(S, sport=50000, dport=80)
    assert h.host.names().count("tcp_connect") == before + 1
    assert h.host.calls[-1][2] == [("127.0.0.1", 80)]


def test_a_flood_of_new_udp_destinations_is_cut_before_the_host_sendto() -> None:
    h = test_udp.UdpHarness(new_flow_rate=10, new_flow_burst=10)
    for port in range(30000, 30100):  # one socket, ever new ports
        h.send(test_udp.REMOTE, port)
    assert len(h.host.of("udp_send")) == 11  # the flow's first datagram, then 10 tokens
    assert h.counters["drop.udp.new_destination_rate"] == 89
    h.send(test_udp.REMOTE, 30000)  # a destination it already has: not limited
    assert len(h.host.of("udp_send")) == 12


@pytest.mark.parametrize("field,value", [("new_flow_rate", 0), ("new_flow_rate", -1.0),
                                         ("new_flow_burst", 0)])
def test_bad_admission_settings_are_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        NetConfig(**{field: value})


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert [bucket.take(1.0) for _ in range(3)] == [True, True, False]
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_known_peers_forget_the_least_recently_added() -> None:
    peers = KnownPeers(size=2)
    peers.add("a")
    peers.add("b")
    peers.add("a")  # refreshed
    peers.add("c")
    assert "a" in peers and "c" in peers and "b" not in peers and len(peers) == 2
