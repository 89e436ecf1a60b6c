"""The DNS upstream misbehaves: what the guest's resolver sees, and that nothing is left.

Defined outcome for every fault: the guest's query gets SERVFAIL (made by the forwarder
once every upstream has failed or timed out), never a forged answer, and no query, ID or
socket is held afterwards. A dead upstream (port closed: ICMP port unreachable) fails at
once; one that answers garbage (random bytes, answers under wrong IDs or to other
questions) is ignored, counted, and times out. (A spoofed answer from another loopback
port is tests/runtime/test_dns_sockets.py::test_stray_and_forged_datagrams_are_ignored.)
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Iterator

import pytest
from scapy.layers.dns import DNS, DNSQR, DNSRR

from tests.runtime.test_dns_sockets import Rig, Upstream, dead_upstream

SERVFAIL = 2


@pytest.fixture
def live() -> Iterator[Upstream]:
    up = Upstream()
    yield up
    up.sock.close()


def _wait_answers(rig: Rig, count: int, timeout: float = 10.0) -> list[DNS]:
    got: list[DNS] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        rig.spin()
        got += [f[DNS] for f in rig.frames() if DNS in f]
    return got


def _nothing_held(rig: Rig) -> bool:
    dns = rig.att.stack.dns
    return not dns.pending and not any(dns.inflight.values())


def test_dead_only_upstream_gives_servfail_at_once() -> None:
    rig = Rig([dead_upstream()])
    rig.att.stack.dns.attempt_timeout = 30.0  # an answer before this is the ICMP error's doing
    try:
        rig.ask("a.example", qid=7, sport=42000)
        [answer] = _wait_answers(rig, 1)
        assert (answer.id, answer.rcode, answer.qd[0].qname) == (7, SERVFAIL, b"a.example.")
        assert _nothing_held(rig)
        assert rig.att.stack.counters.get("dns.upstream_timeout") is None
    finally:
        rig.close()


def _garbage(query: bytes, rng: random.Random) -> list[bytes]:
    q = DNS(query)
    wrong_id = DNS(id=q.id ^ 0x5A5A, qr=1, qd=q.qd, an=[DNSRR(rrname=q.qd[0].qname,
                                                            rdata="6.6.6.6")])
    other_question = DNS(id=q.id, qr=1, qd=DNSQR(qname="evil.example"),
                         an=[DNSRR(rrname="evil.example", rdata="6.6.6.6")])
    no_question = DNS(id=q.id, qr=1, rcode=0, an=[DNSRR(rrname=q.qd[0].qname, rdata="6.6.6.6")])
    not_a_response = DNS(id=q.id, qr=0, qd=q.qd)
    noise = [rng.randbytes(n) for n in (0, 1, 11, 12, 40, 512)]
    # Random bytes that start with the right ID: parsed further, still refused.
    noise += [query[:2] + rng.randbytes(n) for n in (10, 30, 300)]
    return [bytes(wrong_id), bytes(other_question), bytes(no_question), bytes(not_a_response),
            *noise]


def test_upstream_answering_garbage_is_ignored_and_the_guest_gets_servfail(
        live: Upstream) -> None:
    rig = Rig([live.addr])
    rig.att.stack.dns.attempt_timeout = 0.5
    rng = random.Random(1)
    try:
        rig.ask("a.example", qid=9, sport=42001)
        rig.ask("b.example", qid=10, sport=42001)
        rig.spin()
        queries = live.queries()
        assert len(queries) == 2
        for query, peer in queries:
            for junk in _garbage(query, rng):
                live.sock.sendto(junk, peer)
        answers = _wait_answers(rig, 2)
        assert sorted((a.id, a.rcode) for a in answers) == [(9, SERVFAIL), (10, SERVFAIL)]
        assert not any(a.an for a in answers), "a forged record reached the guest"
        counters = rig.att.stack.counters
        assert counters["dns.upstream_timeout"] == 2
        assert _nothing_held(rig)
        # The upstream recovers: the next query is answered over the same socket.
        rig.ask("c.example", qid=11, sport=42001)
        rig.spin()
        [(query, peer)] = live.queries()
        live.answer(query, peer)
        [answer] = _wait_answers(rig, 1)
        assert (answer.id, answer.rcode, answer.an[0].rdata) == (11, 0, "192.0.2.7")
    finally:
        rig.close()


def test_an_upstream_that_was_down_is_heard_again_once_it_is_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream's port was closed (ICMP port unreachable: SERVFAIL), then its
    resolver starts again on the same port: the next query is answered.

    (Before, under uvloop, the error's POLLERR stopped the upstream socket's reader for
    good: every later answer stayed unread and each query timed out to SERVFAIL.)"""
    import uvloop

    monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)  # as pyslirp runs
    addr = dead_upstream()
    rig = Rig([addr])
    rig.att.stack.dns.attempt_timeout = 30.0  # an answer before this is not a timeout's
    try:
        rig.ask("down.example", qid=21, sport=42010)
        [refused] = _wait_answers(rig, 1)
        assert (refused.id, refused.rcode) == (21, SERVFAIL)
        back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        back.bind(addr)
        back.setblocking(False)
        try:
            rig.ask("up.example", qid=22, sport=42011)
            query, peer = _wait_query(back)
            back.sendto(bytes(DNS(id=DNS(query).id, qr=1, rd=1, ra=1, qd=DNS(query).qd,
                                  an=[DNSRR(rrname="up.example", rdata="192.0.2.8")])), peer)
            answers = _wait_answers(rig, 1)
            assert answers, "the upstream answered, the forwarder never read it"
            assert [(a.id, a.rcode, a.an[0].rdata) for a in answers] == [(22, 0, "192.0.2.8")]
        finally:
            back.close()
    finally:
        rig.close()


def _wait_query(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            data, peer = sock.recvfrom(4096)
            return data, peer
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("the forwarder sent no query upstream") from None
            time.sleep(0.01)
