"""DnsForwarder: what the guest gets back, and which upstream is asked when.

The fake runtime records what the forwarder sends to each upstream (under an
ID the forwarder chose); upstream answers are made from those datagrams, as a
real resolver would, and delivered as datagrams read from that upstream's
socket.
"""

from __future__ import annotations

import logging
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP

from pyslirp.stack.dns import (
    DnsForwarder,
    DnsQuery,
    ipv4_upstreams,
    is_ipv6,
    parse_resolv_conf,
)
from pyslirp.wire import dns, ipv4
from pyslirp.wire import udp as wire_udp
from pyslirp.wire.checksum import checksum
from pyslirp.wire.ethernet import EthernetFrame
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.udp import UdpDatagram
from tests.stack import fakes

GUEST = "10.0.2.100"
UP1, UP2, UP3 = ("127.0.0.11", 53), ("127.0.0.12", 53), ("127.0.0.13", 5353)


class FakeHost(fakes.FakeHost):
    """The shared recording host, with the DNS calls also kept apart by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[DnsQuery, tuple[str, int], bytes]] = []
        self.cancelled: list[DnsQuery] = []
        self.released: list[tuple[str, int]] = []
        self.on_send: Any = None

    def dns_send(self, query: Any, upstream: tuple[str, int], data: Any) -> None:
        super().dns_send(query, upstream, data)
        self.sent.append((query, upstream, bytes(data)))
        if self.on_send is not None:
            self.on_send(query, upstream)

    def dns_cancel(self, query: Any) -> None:
        super().dns_cancel(query)
        self.cancelled.append(query)

    def dns_release(self, upstream: tuple[str, int]) -> None:
        super().dns_release(upstream)
        self.released.append(upstream)


class Harness(fakes.StackHarness):
    """The shared stack rig; queries go straight to its DNS forwarder."""

    host: FakeHost

    def __init__(self, upstreams: list[tuple[str, int]] | None = None, **cfg: Any) -> None:
        super().__init__(host=FakeHost(), start=100.0, guest_mac=b"\x02\x00\x00\x00\x00\x01",
                         **cfg)
        self.fwd = self.stack.dns
        self.stack.set_dns_upstreams([UP1, UP2, UP3] if upstreams is None else upstreams)

    def query(self, payload: bytes, sport: int = 40000, src: str = GUEST) -> None:
        raw = bytes(IP(src=src, dst="10.0.2.3") / UDP(sport=sport, dport=53) / payload)
        pkt = Ipv4Packet(memoryview(raw))
        self.fwd.handle_query(pkt, UdpDatagram(pkt.payload, pkt.src, pkt.dst, True), self.now)

    def answer(self, i: int = -1, rcode: int = 0,
               make: Callable[[bytes], bytes] | None = None,
               upstream: tuple[str, int] | None = None) -> bytes:
        """The upstream of the i-th datagram sent answers it; returns the answer as sent."""
        _, to, data = self.host.sent[i]
        reply = make(data) if make is not None else make_reply(data, rcode)
        self.fwd.upstream_datagram(upstream or to, reply, self.now)
        return reply

    def answers(self) -> list[tuple[str, int, bytes]]:
        """What the guest received: (dst ip, dst port, DNS payload), and clear."""
        out = []
        for f in self.replies():
            e = EthernetFrame(memoryview(f))
            p = Ipv4Packet(e.payload)
            assert checksum(p.buf[:20]) in (0, 0xFFFF)  # the header sums to zero
            u = UdpDatagram(p.payload, p.src, p.dst, verify_checksum=True)
            assert u.csum != 0
            assert (bytes(p.src), u.src_port) == (self.config.dns, 53)
            out.append((".".join(map(str, p.dst)), u.dst_port, bytes(u.payload)))
        return out

    def upstreams_asked(self) -> list[tuple[str, int]]:
        return [u for _, u, _ in self.host.sent]

    def wire_ids(self) -> list[int]:
        return [wire_id(d) for _, _, d in self.host.sent]


def make_query(name: str = "example.com", qid: int = 0x1A2B, qtype: str = "A") -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def make_reply(query: bytes, rcode: int = 0, addr: str = "192.0.2.1") -> bytes:
    q = DNS(query)
    an = [DNSRR(rrname=q.qd[0].qname, rdata=addr)] if rcode == 0 else []
    return bytes(DNS(id=q.id, qr=1, rd=1, ra=1, rcode=rcode, qd=q.qd, an=an))


def wire_id(data: bytes) -> int:
    return int(struct.unpack_from("!H", data)[0])


def with_id(data: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + data[2:]


# ---- forwarding ------------------------------------------------------------------


def test_query_forwarded_under_its_own_id_and_answer_returned_with_the_guests() -> None:
    h = Harness()
    q = make_query()
    h.query(q, sport=40001)
    [(query, upstream, sent)] = h.host.sent
    assert query is h.fwd.pending[(bytes([10, 0, 2, 100]), 40001, 0x1A2B)]
    assert upstream == UP1
    assert sent[2:] == q[2:]  # byte for byte but the ID
    assert (query.guest_port, query.query_id, query.attempt) == (40001, 0x1A2B, 0)
    reply = h.answer()
    assert h.answers() == [(GUEST, 40001, with_id(reply, 0x1A2B))]
    assert h.answers() == [] and h.host.cancelled == [query]
    assert h.fwd.pending == {}
    h.advance(10)  # the finished query's timer must not fire anything
    assert h.upstreams_asked() == [UP1] and h.answers() == []


def test_ids_are_random_and_unique_among_an_upstreams_pending_attempts() -> None:
    h = Harness()
    # A source that repeats itself: an ID in use must not be used again.
    batches = iter([b"\x12\x34" * 255 + b"\x56\x78", b"\x9a\xbc" * 256])
    h.fwd.random_bytes = lambda n: next(batches)
    for port in (40001, 40002, 40003):
        h.query(make_query(qid=7), sport=port)  # the guest uses one ID on three sockets
    ids = h.wire_ids()
    assert len(set(ids)) == 3
    # Answers in another order each reach the socket that asked, with its ID back.
    for i in (2, 0, 1):
        h.answer(i)
    got = h.answers()
    assert [port for _, port, _ in got] == [40003, 40001, 40002]
    assert all(wire_id(d) == 7 for _, _, d in got)
    # A finished attempt's ID may be used again.
    h.fwd.random_bytes = lambda n: b"\x12\x34" * (n // 2)
    h.query(make_query(qid=8), sport=40004)
    assert wire_id(h.host.sent[-1][2]) in ids


def test_default_ids_come_from_a_strong_source_and_vary() -> None:
    h = Harness()
    for port in range(40000, 40040):
        h.query(make_query(qid=1), sport=port)
    assert len(set(h.wire_ids())) == 40


def test_nxdomain_is_an_answer_not_a_failure() -> None:
    h = Harness()
    h.query(make_query("nope.invalid"))
    nx = h.answer(rcode=dns.RCODE_NXDOMAIN)
    assert h.answers() == [(GUEST, 40000, with_id(nx, 0x1A2B))]
    assert h.upstreams_asked() == [UP1]


def test_failover_in_order_on_timeout_failure_and_servfail() -> None:
    h = Harness()
    q = make_query()
    h.query(q)
    query = h.host.sent[0][0]
    h.advance(1.9)
    assert h.upstreams_asked() == [UP1]
    h.advance(0.2)  # UP1 timed out
    assert h.upstreams_asked() == [UP1, UP2]
    h.fwd.upstream_failed(query, h.now, UP2)  # UP2 could not be sent to
    assert h.upstreams_asked() == [UP1, UP2, UP3]
    assert h.answers() == []
    good = h.answer()
    assert h.answers() == [(GUEST, 40000, with_id(good, 0x1A2B))]
    assert [d[2:] for _, _, d in h.host.sent] == [q[2:]] * 3

    h2 = Harness()
    h2.query(q)
    h2.answer(rcode=dns.RCODE_SERVFAIL)
    h2.answer(rcode=dns.RCODE_REFUSED)
    assert h2.upstreams_asked() == [UP1, UP2, UP3]
    good = h2.answer()
    assert h2.answers() == [(GUEST, 40000, with_id(good, 0x1A2B))]


def test_each_attempt_gets_its_own_timeout() -> None:
    h = Harness()
    h.query(make_query())
    h.advance(1.5)
    h.fwd.upstream_failed(h.host.sent[0][0], h.now, UP1)  # -> UP2 at t=1.5
    h.advance(1.9)
    assert h.upstreams_asked() == [UP1, UP2]
    h.advance(0.2)
    assert h.upstreams_asked() == [UP1, UP2, UP3]


def test_timeouts_of_many_queries_fire_in_order_even_after_the_timeout_changes() -> None:
    h = Harness(upstreams=[UP1, UP2])
    h.query(make_query(qid=1))
    h.advance(0.5)
    h.fwd.attempt_timeout = 1.0  # lowered: the next query's deadline comes first
    h.query(make_query(qid=2))
    h.advance(0.9)
    assert h.upstreams_asked() == [UP1, UP1]
    h.advance(0.2)  # t=1.6: query 2 timed out at 1.5, query 1 not yet (2.0)
    assert [(q.query_id, u) for q, u, _ in h.host.sent] == [(1, UP1), (2, UP1), (2, UP2)]
    h.advance(0.5)  # t=2.1
    assert [(q.query_id, u) for q, u, _ in h.host.sent][3:] == [(1, UP2)]


def test_all_upstreams_time_out_gives_servfail() -> None:
    h = Harness()
    q = make_query()
    h.query(q, sport=5555)
    for _ in range(3):
        assert h.answers() == []
        h.advance(2.01)
    assert h.upstreams_asked() == [UP1, UP2, UP3]
    [(dst, port, data)] = h.answers()
    assert (dst, port) == (GUEST, 5555)
    assert data == dns.build_error_reply(q, dns.RCODE_SERVFAIL)
    reply = DNS(data)
    assert reply.id == 0x1A2B and reply.qr == 1 and reply.rcode == 2
    assert reply.qd[0].qname == b"example.com."
    assert h.fwd.pending == {} and len(h.host.cancelled) == 1
    assert h.link.counters["dns.all_upstreams_failed"] == 1


def test_all_fail_passes_on_the_last_upstream_error_reply() -> None:
    h = Harness(upstreams=[UP1, UP2])
    h.query(make_query())
    h.answer(rcode=dns.RCODE_SERVFAIL)
    refused = h.answer(rcode=dns.RCODE_REFUSED)
    assert h.answers() == [(GUEST, 40000, with_id(refused, 0x1A2B))]


def test_failures_reported_synchronously_by_the_runtime() -> None:
    # A runtime whose send fails at once (ENETUNREACH) reports it from inside dns_send.
    h = Harness()
    h.host.on_send = lambda query, upstream: h.fwd.upstream_failed(query, h.now, upstream)
    q = make_query()
    h.query(q)
    assert h.upstreams_asked() == [UP1, UP2, UP3]
    assert h.answers() == [(GUEST, 40000, dns.build_error_reply(q, dns.RCODE_SERVFAIL))]
    assert h.fwd.pending == {}


def test_late_failure_of_an_earlier_upstream_does_not_skip_the_current_one() -> None:
    h = Harness()
    h.query(make_query())
    query = h.host.sent[0][0]
    h.advance(2.1)  # now asking UP2
    h.fwd.upstream_failed(query, h.now, upstream=UP1)
    h.fwd.upstream_error(UP1, h.now, h.wire_ids()[0])
    h.fwd.upstream_error(UP1, h.now)
    h.answer(0, rcode=dns.RCODE_SERVFAIL)
    assert h.upstreams_asked() == [UP1, UP2]
    # ... but a late good answer from UP1 is used.
    good = h.answer(0)
    assert h.answers() == [(GUEST, 40000, with_id(good, 0x1A2B))]
    # Once finished, neither upstream's answer is matched any more.
    h.answer(1)
    assert h.answers() == [] and h.link.counters["dns.drop.mismatched_reply"] == 1


def test_socket_error_with_the_datagrams_id_fails_over_that_attempt_only() -> None:
    h = Harness()
    h.query(make_query(qid=1), sport=40001)
    h.query(make_query(qid=2), sport=40002)
    first, second = h.wire_ids()
    h.fwd.upstream_error(UP1, h.now, second)
    assert h.upstreams_asked() == [UP1, UP1, UP2]
    h.fwd.upstream_error(UP1, h.now, 0xFFFF if first != 0xFFFF else 0)  # no such attempt
    h.fwd.upstream_error(UP2, h.now, first)  # not sent there
    assert len(h.host.sent) == 3
    h.answer(0)
    h.answer(2)
    assert sorted(port for _, port, _ in h.answers()) == [40001, 40002]


def test_socket_error_without_an_id_fails_over_every_attempt_waiting_there() -> None:
    h = Harness(upstreams=[UP1, UP2])
    h.query(make_query(qid=1), sport=40001)
    h.query(make_query(qid=2), sport=40002)
    h.answer(1, rcode=dns.RCODE_SERVFAIL)  # query 2 moved on to UP2
    h.query(make_query(qid=3), sport=40003)
    h.fwd.upstream_error(UP1, h.now)
    assert [(q.query_id, u) for q, u, _ in h.host.sent] == [
        (1, UP1), (2, UP1), (2, UP2), (3, UP1), (1, UP2), (3, UP2)]
    assert h.link.counters["dns.upstream_failed"] == 2


def test_upstream_list_change_does_not_affect_queries_in_flight() -> None:
    h = Harness()
    h.query(make_query())
    h.fwd.upstreams = [("127.0.0.99", 53)]
    h.advance(2.1)
    assert h.upstreams_asked() == [UP1, UP2]
    h.query(make_query(qid=2))
    assert h.upstreams_asked()[-1] == ("127.0.0.99", 53)


def test_sockets_of_upstreams_no_longer_used_are_released() -> None:
    h = Harness(upstreams=[UP1, UP2])
    h.query(make_query(qid=1))
    h.query(make_query(qid=2), sport=40001)
    h.answer(1)
    h.fwd.upstreams = [UP2]
    assert h.host.released == []  # query 1 still waits on UP1
    h.answer(0)
    assert h.host.released == [UP1]
    h.query(make_query(qid=3))
    h.answer()
    assert h.host.released == [UP1]  # UP2 is still in use
    h.fwd.upstreams = [UP3]
    assert h.host.released == [UP1, UP2]
    h.query(make_query(qid=4))
    h.fwd.close_all()
    assert h.host.released == [UP1, UP2, UP3]
    assert [dns.DnsMessage(d).rcode for _, _, d in h.answers()][-1] == dns.RCODE_SERVFAIL


def test_runtime_without_dns_release_still_works() -> None:
    class OlderHost:
        def dns_send(self, query: Any, upstream: tuple[str, int], data: Any) -> None:
            pass

        def dns_cancel(self, query: Any) -> None:
            pass

    h = Harness()
    h.fwd = DnsForwarder(h.config, h.link, OlderHost(), h.timers)  # type: ignore[arg-type]
    h.fwd.upstreams = [UP1]
    h.query(make_query())
    h.fwd.upstreams = [UP2]
    h.fwd.close_all()
    assert [dns.DnsMessage(d).rcode for _, _, d in h.answers()] == [dns.RCODE_SERVFAIL]


def test_no_upstreams_servfail_at_once() -> None:
    h = Harness(upstreams=[])
    q = make_query()
    h.query(q)
    assert h.answers() == [(GUEST, 40000, dns.build_error_reply(q, dns.RCODE_SERVFAIL))]
    assert h.host.sent == []


# ---- replies that are not for us -------------------------------------------------


@pytest.mark.parametrize("bad", [
    lambda d: b"\x00",                                       # unreadable
    lambda d: with_id(make_reply(d), wire_id(d) ^ 1),        # other ID
    lambda d: d,                                             # not a response (QR=0)
    lambda d: with_id(make_reply(make_query("evil.example")), wire_id(d)),  # other question
    lambda d: with_id(make_reply(make_query(qtype="AAAA")), wire_id(d)),    # other type
    lambda d: struct.pack("!HHHHHH", wire_id(d), 0x8180, 0, 1, 0, 0)      # no question
    + bytes(DNSRR(rrname="example.com", rdata="6.6.6.6")),
    lambda d: d[:12] + b"\xc0\x30\x00\x01\x00\x01",          # unreadable question
])
def test_mismatched_replies_are_ignored(bad: Callable[[bytes], bytes]) -> None:
    h = Harness()
    h.query(make_query())
    h.answer(make=bad)
    assert h.answers() == [] and h.upstreams_asked() == [UP1]
    good = h.answer()
    assert h.answers() == [(GUEST, 40000, with_id(good, 0x1A2B))]


def test_flood_of_garbage_and_wrong_ids_leaves_the_query_waiting_then_failing_over() -> None:
    h = Harness()
    h.query(make_query())
    _, _, sent = h.host.sent[0]
    reply = make_reply(sent)
    rng = random.Random(3)
    for _ in range(5000):
        garbage = rng.randbytes(rng.randrange(0, 120))
        h.fwd.upstream_datagram(UP1, garbage, h.now)
        other = rng.randrange(0x10000)
        if other != wire_id(sent):
            h.fwd.upstream_datagram(UP1, with_id(reply, other), h.now)
    assert h.answers() == [] and len(h.fwd.pending) == 1
    assert len(h.fwd.inflight[UP1]) == 1 and len(h.fwd._expiry) == 1
    counters = h.link.counters
    assert counters["dns.drop.mismatched_reply"] + counters["dns.drop.bad_reply"] >= 5000
    # Waiting goes on to the attempt's timeout, then the next upstream answers.
    h.advance(h.fwd.attempt_timeout)
    assert h.upstreams_asked() == [UP1, UP2]
    good = h.answer()
    assert h.answers() == [(GUEST, 40000, with_id(good, 0x1A2B))]


def test_second_answer_to_the_same_attempt_is_dropped() -> None:
    h = Harness()
    h.query(make_query())
    first = h.answer()
    h.answer(make=lambda d: make_reply(d, addr="198.51.100.7"))
    assert h.answers() == [(GUEST, 40000, with_id(first, 0x1A2B))]
    assert h.link.counters["dns.drop.mismatched_reply"] == 1


def test_truncated_answers_go_to_the_guest_as_they_came() -> None:
    h = Harness()
    # TC set by the upstream: the guest retries over TCP.
    h.query(make_query(qid=1))
    tc = h.answer(make=lambda d: bytes(DNS(id=wire_id(d), qr=1, tc=1, qd=DNS(d).qd)))
    # Cut short inside the answer record: not parsed here, passed on.
    h.query(make_query(qid=2), sport=40001)
    cut = h.answer(make=lambda d: make_reply(d)[:-3])
    got = h.answers()
    assert got == [(GUEST, 40000, with_id(tc, 1)), (GUEST, 40001, with_id(cut, 2))]
    assert dns.DnsMessage(got[0][2]).flags & dns.FLAG_TC
    assert h.fwd.pending == {}


def test_reply_from_another_upstream_is_ignored() -> None:
    h = Harness()
    h.query(make_query())
    h.answer(upstream=UP2)  # the right ID, but not from where the query went
    assert h.answers() == [] and h.link.counters["dns.drop.mismatched_reply"] == 1
    h.answer()
    assert len(h.answers()) == 1


def test_error_reply_without_question_is_accepted() -> None:
    h = Harness(upstreams=[UP1])
    h.query(make_query())
    formerr = h.answer(make=lambda d: struct.pack("!HHHHHH", wire_id(d), 0x8181, 0, 0, 0, 0))
    assert h.answers() == [(GUEST, 40000, with_id(formerr, 0x1A2B))]


def test_question_case_differs_in_reply_is_accepted() -> None:
    h = Harness()
    h.query(make_query("ExAmPlE.cOm"))
    reply = h.answer(make=lambda d: with_id(make_reply(make_query("example.com")), wire_id(d)))
    assert h.answers() == [(GUEST, 40000, with_id(reply, 0x1A2B))]


def test_query_with_compressed_question_is_forwarded_and_matched() -> None:
    # A name that points into the header: odd, but readable, so it is forwarded.
    h = Harness()
    head = struct.pack("!HHHHHH", 0x1A2B, 0x0100, 1, 0, 0, 0)
    # The pointer goes to offset 4 (QDCOUNT's high byte, 0 = the root name).
    q = head + b"\xc0\x04\x00\x01\x00\x01"
    h.query(q)
    assert h.upstreams_asked() == [UP1]
    sent = h.host.sent[0][2]
    reply = sent[:2] + b"\x81\x80" + sent[4:]  # echo as a response, question as asked
    h.fwd.upstream_datagram(UP1, reply, h.now)
    assert h.answers() == [(GUEST, 40000, with_id(reply, 0x1A2B))]


def test_reply_bigger_than_mtu_is_truncated() -> None:
    h = Harness(mtu=576)
    h.query(make_query("big.example", qtype="TXT"))

    def big(d: bytes) -> bytes:
        return bytes(DNS(id=wire_id(d), qr=1, rd=1, ra=1,
                         qd=DNSQR(qname="big.example", qtype="TXT"),
                         an=[DNSRR(rrname="big.example", type="TXT", rdata="x" * 200)] * 5))

    assert len(big(h.host.sent[0][2])) > 576 - 28
    h.answer(make=big)
    [(_, _, data)] = h.answers()
    msg = dns.DnsMessage(data)
    assert msg.truncated and msg.id == 0x1A2B and msg.ancount == 0
    assert msg.question() is not None and msg.question().name == "big.example"  # type: ignore[union-attr]


@pytest.mark.parametrize("offload", [True, False])
def test_answers_on_a_link_with_vnet_headers(offload: bool) -> None:
    h = Harness(vnet_hdr=True, offload=offload)
    h.query(make_query(), sport=40001)
    h.query(make_query("x" * 63 + ".example", qid=9), sport=40001)  # odd and even lengths
    h.fwd.close_all()
    good = make_reply(make_query())
    h.query(make_query(), sport=40002)
    h.answer(make=lambda d: with_id(good, wire_id(d)))
    got = h.answers()  # checksums the guest's kernel completes, completed (see replies)
    assert [(port, wire_id(d)) for _, port, d in got] == [(40001, 0x1A2B), (40001, 9),
                                                          (40002, 0x1A2B)]
    assert got[2][2] == good


# ---- bad queries and limits -----------------------------------------------------


def test_unreadable_header_dropped_and_counted() -> None:
    h = Harness()
    h.query(b"\x12\x34\x01")
    assert h.answers() == [] and h.host.sent == []
    assert h.link.counters["dns.drop.malformed"] == 1


def test_response_sent_to_us_is_dropped() -> None:
    h = Harness()
    h.query(make_reply(make_query()))
    assert h.answers() == [] and h.host.sent == []
    assert h.link.counters["dns.drop.not_query"] == 1


@pytest.mark.parametrize("payload", [
    make_query()[:12] + b"\xc0\x0c\x00\x01\x00\x01",      # pointer loop
    make_query()[:20],                                    # question cut short
    make_query()[:-4],                                    # no type and class
    make_query()[:12] + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # label too long
    make_query()[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",  # name > 255
    b"\x1a\x2b\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",  # no question
    bytes(DNS(id=0x1A2B, rd=1, qd=[DNSQR(qname="a.example"), DNSQR(qname="b.example")])),
])
def test_malformed_queries_get_formerr(payload: bytes) -> None:
    h = Harness()
    h.query(payload)
    [(dst, port, data)] = h.answers()
    msg = dns.DnsMessage(data)
    assert (dst, port, msg.id, msg.rcode, msg.is_response) == (
        GUEST, 40000, 0x1A2B, dns.RCODE_FORMERR, True)
    assert h.host.sent == []


def test_longest_name_is_forwarded() -> None:
    h = Harness()
    name = ".".join(["a" * 63] * 3 + ["a" * 61])  # 255 bytes in wire form
    h.query(make_query(name))
    assert h.upstreams_asked() == [UP1]
    h.answer()
    assert dns.DnsMessage(h.answers()[0][2]).rcode == dns.RCODE_NOERROR


def test_other_opcode_gets_notimp() -> None:
    h = Harness()
    h.query(bytes(DNS(id=7, opcode=4, qd=DNSQR(qname="example.com"))))  # NOTIFY
    [(_, _, data)] = h.answers()
    assert dns.DnsMessage(data).rcode == dns.RCODE_NOTIMP
    assert h.host.sent == []


def test_retransmission_while_in_flight_is_not_forwarded_twice() -> None:
    h = Harness()
    q = make_query()
    h.query(q)
    h.query(q)
    assert h.upstreams_asked() == [UP1]
    h.query(q, sport=40002)  # another socket of the guest: a different query
    assert h.upstreams_asked() == [UP1, UP1]


def test_pending_limit() -> None:
    h = Harness()
    h.fwd.max_pending = 3
    for i in range(5):
        h.query(make_query(qid=i))
    assert len(h.host.sent) == 3
    assert h.link.counters["dns.drop.pending_limit"] == 2
    assert h.answers() == []
    # Once one finishes, there is room again.
    h.answer(0)
    h.query(make_query(qid=99))
    assert len(h.host.sent) == 4


def fast_query(h: Harness, payload: bytes, sport: int) -> None:
    """Harness.query without scapy (for tests that send tens of thousands)."""
    src, dst = bytes([10, 0, 2, 100]), h.config.dns
    datagram = wire_udp.build(src, sport, dst, 53, payload)
    head = bytearray(ipv4.MIN_HEADER_LEN)
    ipv4.build_header(head, 0, src, dst, wire_udp.PROTO, len(datagram))
    pkt = Ipv4Packet(memoryview(bytes(head) + datagram))
    h.fwd.handle_query(pkt, UdpDatagram(pkt.payload, pkt.src, pkt.dst, True), h.now)


def answer_noerror(data: bytes) -> bytes:
    """The query sent upstream turned into its (empty, NOERROR) answer: QR set."""
    return data[:2] + bytes([data[2] | 0x80]) + data[3:]


def test_answered_queries_are_not_kept_behind_an_unanswered_one() -> None:
    # 30,000 answered queries behind one that waits for its timeout used to stay
    # referenced from the deadline queue (+58 MiB): memory must follow max_pending.
    h = Harness()
    h.query(make_query("stuck.example", qid=1))
    template = make_query("example.com")
    for i in range(30_000):
        fast_query(h, with_id(template, i & 0xFFFF), sport=1024 + (i >> 16))
        _query, upstream, data = h.host.sent[-1]
        h.fwd.upstream_datagram(upstream, answer_noerror(data), h.now)
        if len(h.frames) > 1000:
            h.frames.clear()
    assert h.link.counters["dns.query"] == 30_001
    assert len(h.fwd.pending) == 1
    bound = 2 * h.fwd.max_pending
    assert len(h.fwd._expiry) <= bound
    assert len({id(query) for _, query, _ in h.fwd._expiry}) <= bound
    # The unanswered one still times out, attempt after attempt, and gets its SERVFAIL.
    h.frames.clear()
    sent = len(h.host.sent)
    h.advance(h.fwd.attempt_timeout)
    assert h.upstreams_asked()[sent:] == [UP2]
    h.advance(h.fwd.attempt_timeout)
    h.advance(h.fwd.attempt_timeout)
    [(_ip, port, reply)] = h.answers()
    assert port == 40000 and dns.DnsMessage(reply).rcode == dns.RCODE_SERVFAIL
    assert h.fwd.pending == {} and len(h.fwd._expiry) == 0


def test_deadline_queue_stays_bounded_when_queries_fail_over() -> None:
    # Queries that move on to the next upstream leave their old entry behind too.
    h = Harness()
    h.query(make_query("stuck.example", qid=1))
    template = make_query("example.com")
    for i in range(5_000):
        fast_query(h, with_id(template, i), sport=2000)
        query, upstream, data = h.host.sent[-1]
        h.fwd.upstream_failed(query, h.now, upstream)  # on to UP2
        _query, upstream, data = h.host.sent[-1]
        h.fwd.upstream_datagram(upstream, answer_noerror(data), h.now)
        h.frames.clear()
    assert len(h.fwd.pending) == 1
    assert len(h.fwd._expiry) <= 2 * h.fwd.max_pending


def test_close_answers_everyone() -> None:
    h = Harness()
    h.query(make_query(qid=1))
    h.query(make_query(qid=2), sport=40001)
    h.fwd.close_all()
    got = sorted((port, dns.DnsMessage(d).rcode) for _, port, d in h.answers())
    assert got == [(40000, dns.RCODE_SERVFAIL), (40001, dns.RCODE_SERVFAIL)]
    assert len(h.host.cancelled) == 2 and h.fwd.pending == {}
    h.advance(10)
    assert h.answers() == [] and len(h.host.sent) == 2


def test_many_queries_in_flight_each_get_their_own_answer() -> None:
    h = Harness()
    for i in range(300):
        h.query(make_query(f"n{i}.example", qid=i), sport=40000 + i % 7)
    order = list(range(300))
    order = order[1::2] + order[::2]
    for i in order:
        h.answer(i, make=lambda d, i=i: make_reply(d, addr=f"192.0.2.{i % 250}"))
    got = h.answers()
    assert len(got) == 300 and h.fwd.pending == {}
    for (_, port, data), i in zip(got, order, strict=True):
        reply = DNS(data)
        assert (reply.id, port, reply.qd[0].qname) == (i, 40000 + i % 7,
                                                         f"n{i}.example.".encode())
        assert reply.an[0].rdata == f"192.0.2.{i % 250}"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80))
def test_random_queries_and_replies_never_raise(query: bytes, reply: bytes) -> None:
    h = Harness()
    h.query(make_query()[:12] + query)
    h.query(query)
    for _, upstream, data in list(h.host.sent):
        h.fwd.upstream_datagram(upstream, data[:2] + make_reply(make_query())[2:12] + reply,
                                h.now)
        h.fwd.upstream_datagram(upstream, data[:2] + reply, h.now)
        h.fwd.upstream_datagram(upstream, reply, h.now)
        h.fwd.upstream_error(upstream, h.now, wire_id(data))
    for _ in range(3):
        h.advance(2.1)
    assert h.fwd.pending == {}


# ---- resolv.conf -----------------------------------------------------------------


def test_resolv_conf_typical() -> None:
    text = """# Generated by NetworkManager
search corp.example.com example.com.
nameserver 192.0.2.53
nameserver 2001:db8::53
; another comment
nameserver 127.0.0.53  # systemd-resolved
options edns0 trust-ad
"""
    servers, search = parse_resolv_conf(text)
    assert servers == ["192.0.2.53", "2001:db8::53", "127.0.0.53"]
    assert search == ["corp.example.com", "example.com"]
    assert ipv4_upstreams(servers) == [("192.0.2.53", 53), ("127.0.0.53", 53)]


def test_resolv_conf_domain_search_last_wins_and_junk() -> None:
    text = """
domain first.example
search a.example b.example
domain last.example extra.ignored
nameserver
nameserver not-an-address
nameserver 300.1.1.1
nameserver fe80::1%eth0
nameserver 192.0.2.1
nameserver 192.0.2.1
   nameserver 192.0.2.2
sortlist 130.155.160.0/255.255.240.0
search .
"""
    servers, search = parse_resolv_conf(text)
    assert servers == ["fe80::1%eth0", "192.0.2.1", "192.0.2.2"]
    assert is_ipv6("fe80::1%eth0")
    assert search == []


def test_resolv_conf_domain_keyword() -> None:
    assert parse_resolv_conf("domain lab.example.\nnameserver 10.1.1.1\n") == (
        ["10.1.1.1"], ["lab.example"])
    assert parse_resolv_conf("") == ([], [])


def test_resolv_conf_search_domain_dhcp_cannot_serve_is_skipped_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyslirp")
    # What reading a non-UTF-8 resolv.conf with errors="replace" gives.
    _servers, search = parse_resolv_conf("search corp\ufffd.example ok.example\n")
    assert search == ["ok.example"]
    assert "corp\ufffd.example" in caplog.text and "resolv.conf" in caplog.text
