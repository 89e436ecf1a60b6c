"""socket() failing with EMFILE in the runtime: each kind of new flow fails the way a refused
one does, old flows are untouched, every failure is counted, and the log gets one warning
per SOCKET_WARNING_INTERVAL, not one per attempt. (The real thing, with RLIMIT_NOFILE, is
tests/e2e/test_faults_e2e.py::test_out_of_fds_refuses_new_flows_and_keeps_old_ones.)
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP

from pyslirp.runtime import hostsockets
from pyslirp.stack.config import NetConfig
from tests.runtime.linkrig import GUEST, LinkRig

GATEWAY = "10.0.2.2"


class Rig(LinkRig):
    def __init__(self) -> None:
        super().__init__(NetConfig(vnet_hdr=False, offload=False,
                                   dns_upstreams=[("127.0.0.1", 9)]))
        self.know_guest()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def no_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every socket() the runtime makes from now on fails as at RLIMIT_NOFILE."""

    def refuse(*_args: Any, **_kw: Any) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(hostsockets.socket, "socket", refuse)
    # (TCP connects make the C socket type itself: see HostSockets._tcp_try_next.)
    monkeypatch.setattr(hostsockets._socket, "socket", refuse)


def test_each_kind_of_new_flow_is_refused_counted_and_warned_once(
        rig: Rig, no_fds: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyslirp")
    for sport in (40000, 40001, 40002):
        rig.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=sport, dport=80, flags="S", seq=1))
    rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40010, dport=7) / b"x")
    rig.send(IP(src=GUEST, dst="198.18.0.1") / ICMP(type=8, id=1, seq=1))
    rig.send(IP(src=GUEST, dst="10.0.2.3") / UDP(sport=40020, dport=53)
             / DNS(id=5, rd=1, qd=DNSQR(qname="a.example")))
    rig.spin()
    frames = rig.frames()
    resets = [f for f in frames if TCP in f and f[TCP].flags == "RA"]
    assert sorted(f[TCP].dport for f in resets) == [40000, 40001, 40002]
    assert not [f for f in frames if UDP in f and f[UDP].sport == 7]
    [prohibited] = [f for f in frames if ICMP in f and f[ICMP].type == 3]
    assert prohibited[ICMP].code == 13
    [servfail] = [f[DNS] for f in frames if DNS in f]
    assert (servfail.id, servfail.rcode) == (5, 2)
    assert rig.att.stack.counters["host.out_of_fds"] == 6
    warnings = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(warnings) == 1


def test_old_flows_keep_working_and_new_ones_work_once_fds_are_back(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        server.settimeout(5)
        rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40000, dport=port) / b"before")
        assert server.recvfrom(100)[0] == b"before"
        real = hostsockets.socket.socket

        def refuse(*_args: Any, **_kw: Any) -> socket.socket:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(hostsockets.socket, "socket", refuse)
        rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40001, dport=port) / b"refused")
        rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40000, dport=port) / b"old flow")
        assert server.recvfrom(100)[0] == b"old flow"
        monkeypatch.setattr(hostsockets.socket, "socket", real)
        rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40001, dport=port) / b"again")
        assert server.recvfrom(100)[0] == b"again"
    assert rig.att.stack.counters["host.out_of_fds"] == 1
