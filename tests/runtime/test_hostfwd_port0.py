"""HostForwarder with host port 0, and pyslirp.stats reading the stack it forwards into.

Same rig as tests/runtime/test_hostfwd.py: a real Attachment whose "TAP" is a datagram
socketpair, the guest played with scapy, host clients on this machine's loopback.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP

from pyslirp import stats
from tests.netutil import free_port
from tests.runtime.linkrig import GUEST
from tests.runtime.test_hostfwd import GATEWAY, GPORT, Rig, is_syn, tcp_client


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_port_0_serves_the_port_the_kernel_chose_and_is_known_by_it(rig: Rig,
                                                                    proto: str) -> None:
    port = rig.fwd.add(proto, "127.0.0.1", 0, GUEST, GPORT)
    assert 0 < port < 65536
    assert (proto, "127.0.0.1", port) in rig.fwd.forwards
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", port))  # ours now
    assert rig.fwd.add(proto, "127.0.0.1", 0, GUEST, GPORT + 1) != port
    rig.fwd.remove(proto, "127.0.0.1", port)
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", port))  # released


def test_a_fixed_port_is_returned_as_given(rig: Rig) -> None:
    port = free_port()
    assert rig.fwd.add("tcp", "127.0.0.1", port, GUEST, GPORT) == port


def test_snapshot_counts_a_forwarded_connection_and_a_udp_forward(rig: Rig) -> None:
    rig.know_guest()
    assert stats.snapshot(rig.att.stack) == {
        "counters": {}, "flows": {"tcp": 0, "tcp_time_wait": 0, "udp": 0, "icmp": 0, "dns": 0}}
    tport = rig.fwd.add("tcp", "127.0.0.1", 0, GUEST, GPORT)
    rig.fwd.add("udp", "127.0.0.1", 0, GUEST, GPORT)
    with tcp_client(tport):
        syn = rig.wait_frame(is_syn)
        rig.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=GPORT, dport=syn[TCP].sport,
                                                  flags="SA", seq=5000, ack=syn[TCP].seq + 1,
                                                  window=65535))
        rig.spin(0.05)
        snap = stats.snapshot(rig.att.stack)
        assert snap["flows"] == {"tcp": 1, "tcp_time_wait": 0, "udp": 1, "icmp": 0, "dns": 0}
        assert snap["counters"] == {"hostfwd.tcp_opened": 1, "udp.forwards_added": 1}
        assert stats.api_reply(rig.att.stack) == (
            b'{"return":{"counters":{"hostfwd.tcp_opened":1,"udp.forwards_added":1},'
            b'"flows":{"tcp":1,"tcp_time_wait":0,"udp":1,"icmp":0,"dns":0}}}')


def test_table_lists_the_gauges_then_the_counters() -> None:
    table = stats.format_table({"counters": {"tcp.rto": 3, "dns.query": 12},
                                "flows": {"tcp": 1, "tcp_time_wait": 0, "udp": 2, "icmp": 0,
                                          "dns": 0}})
    assert table == ("flows.tcp            1\n"
                     "flows.tcp_time_wait  0\n"
                     "flows.udp            2\n"
                     "flows.icmp           0\n"
                     "flows.dns            0\n"
                     "dns.query            12\n"
                     "tcp.rto              3\n")

