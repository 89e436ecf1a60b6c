"""DNS forwarding through a real Attachment: one shared socket per upstream.

The "TAP" is a datagram socketpair the test plays the guest on (scapy); the
upstreams are UDP sockets of the test on this machine's loopback (nothing else
is contacted). The loop runs in the test thread between steps.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyslirp.stack.config import NetConfig
from tests.runtime.linkrig import GUEST, LinkRig

DNS_IP = "10.0.2.3"


class Upstream:
    """A resolver on loopback that the test drives by hand."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr: tuple[str, int] = self.sock.getsockname()

    def queries(self) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        while True:
            try:
                out.append(self.sock.recvfrom(4096))
            except BlockingIOError:
                return out

    def answer(self, query: bytes, peer: tuple[str, int], addr: str = "192.0.2.7") -> None:
        q = DNS(query)
        self.sock.sendto(bytes(DNS(id=q.id, qr=1, rd=1, ra=1, qd=q.qd,
                                   an=[DNSRR(rrname=q.qd[0].qname, rdata=addr)])), peer)


class Rig(LinkRig):
    def __init__(self, upstreams: list[tuple[str, int]]) -> None:
        super().__init__(NetConfig(vnet_hdr=False, offload=False, dns_upstreams=upstreams))
        self.know_guest()

    def ask(self, name: str, qid: int, sport: int) -> None:
        self.send(IP(src=GUEST, dst=DNS_IP) / UDP(sport=sport, dport=53)
                  / DNS(id=qid, rd=1, qd=DNSQR(qname=name)))

    def answers(self) -> list[tuple[int, int, str, str]]:
        """(guest port, DNS ID, name, first address) of each answer the guest got."""
        return [(f[UDP].dport, f[DNS].id, f[DNS].qd[0].qname.decode(),
                 f[DNS].an[0].rdata if f[DNS].an else "")
                for f in self.frames() if UDP in f and f[UDP].sport == 53]


@pytest.fixture
def live() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.sock.close()


def dead_upstream() -> tuple[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        addr: tuple[str, int] = s.getsockname()
    return addr  # closed again: datagrams to it meet ICMP port unreachable


def test_queries_share_one_socket_and_answers_reach_each_asker(live: Upstream) -> None:
    rig = Rig([live.addr])
    try:
        for i in range(3):
            rig.ask(f"n{i}.example", qid=7, sport=40000 + i)  # one ID, three sockets
        got = live.queries()
        assert len(got) == 3
        assert len({peer for _, peer in got}) == 1  # one source port for all
        assert len({DNS(q).id for q, _ in got}) == 3  # each under its own ID
        for q, peer in reversed(got):
            live.answer(q, peer)
        rig.spin()
        assert sorted(rig.answers()) == [(40000 + i, 7, f"n{i}.example.", "192.0.2.7")
                                         for i in range(3)]
    finally:
        rig.close()


def test_dead_first_upstream_fails_over_at_once_on_the_shared_socket(live: Upstream) -> None:
    rig = Rig([dead_upstream(), live.addr])
    try:
        for i in range(3):
            rig.ask(f"n{i}.example", qid=100 + i, sport=41000)
        rig.spin(0.1)
        got = live.queries()
        # Port unreachable came back for each datagram: well before the 2 s timeout.
        assert sorted(DNS(q).qd[0].qname for q, _ in got) == [
            f"n{i}.example.".encode() for i in range(3)]
        for q, peer in got:
            live.answer(q, peer)
        rig.spin()
        assert sorted(a[1] for a in rig.answers()) == [100, 101, 102]
        # The dead upstream stays in use (it may come back): its socket too.
        rig.ask("again.example", qid=200, sport=41000)
        rig.spin(0.1)
        [(q, peer)] = live.queries()
        live.answer(q, peer)
        rig.spin()
        assert [a[1] for a in rig.answers()] == [200]
    finally:
        rig.close()


def test_stray_and_forged_datagrams_are_ignored(live: Upstream) -> None:
    rig = Rig([live.addr])
    try:
        rig.ask("a.example", qid=1, sport=42000)
        [(q, peer)] = live.queries()
        # From the upstream: an unknown ID, and the right ID with another question.
        other = DNS(q)
        other.id ^= 1
        live.answer(bytes(other), peer)
        wrong = DNS(id=DNS(q).id, qr=1, qd=DNSQR(qname="evil.example"),
                    an=[DNSRR(rrname="evil.example", rdata="6.6.6.6")])
        live.sock.sendto(bytes(wrong), peer)
        # From another port: the connected socket never even sees it.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:
            forger.bind(("127.0.0.1", 0))
            forged = DNS(id=DNS(q).id, qr=1, qd=DNS(q).qd,
                         an=[DNSRR(rrname="a.example", rdata="6.6.6.6")])
            forger.sendto(bytes(forged), peer)
        rig.spin()
        assert rig.answers() == []
        assert rig.att.stack.counters["dns.drop.mismatched_reply"] == 2
        live.answer(q, peer)
        rig.spin()
        assert rig.answers() == [(42000, 1, "a.example.", "192.0.2.7")]
    finally:
        rig.close()


def test_close_answers_waiting_guests_and_closes_the_sockets(live: Upstream) -> None:
    rig = Rig([live.addr])
    rig.ask("a.example", qid=5, sport=43000)
    [(_q, peer)] = live.queries()
    rig.att.close()
    f = Ether(rig.guest.recv(70000))
    assert f[DNS].id == 5 and f[DNS].rcode == 2  # SERVFAIL
    # The upstream's socket is gone: its port is free to bind again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(peer)
    rig.spin(0)
    rig.loop.close()
    rig.tap.close()
    rig.guest.close()


def test_upstream_with_a_zone_keeps_its_scope_id() -> None:
    """``fe80::1%lo`` must reach connect() with lo's scope id, not 0 (EINVAL)."""
    from pyslirp.runtime.hostsockets import sockaddr

    addr = sockaddr("fe80::1%lo", 53)
    assert addr[0] == "fe80::1" and addr[1] == 53
    assert addr[3] == socket.if_nametoindex("lo")
    assert sockaddr("::1", 53) == ("::1", 53)
