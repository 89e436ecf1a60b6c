"""DnsForwarder: what the guest gets back, and which upstream is asked when."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP

from pyslirp.stack.config import NetConfig
from pyslirp.stack.dns import (
    DnsForwarder,
    DnsQuery,
    ipv4_upstreams,
    is_ipv6,
    parse_resolv_conf,
)
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import dns
from pyslirp.wire.ethernet import EthernetFrame
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.udp import UdpDatagram

GUEST = "10.0.2.100"
UP1, UP2, UP3 = ("127.0.0.11", 53), ("127.0.0.12", 53), ("127.0.0.13", 5353)


class FakeHost:
    """Records the DNS calls the forwarder makes into the runtime."""

    def __init__(self) -> None:
        self.sent: list[tuple[DnsQuery, tuple[str, int], bytes]] = []
        self.cancelled: list[DnsQuery] = []
        self.on_send: Any = None

    def dns_send(self, query: Any, upstream: tuple[str, int], data: Any) -> None:
        self.sent.append((query, upstream, bytes(data)))
        if self.on_send is not None:
            self.on_send(query, upstream)

    def dns_cancel(self, query: Any) -> None:
        self.cancelled.append(query)


class Harness:
    def __init__(self, upstreams: list[tuple[str, int]] | None = None, **cfg: Any) -> None:
        self.config = NetConfig(vnet_hdr=False, guest_mac=b"\x02\x00\x00\x00\x00\x01", **cfg)
        self.frames: list[bytes] = []
        self.link = Link(self.config, self._sink)
        self.host = FakeHost()
        self.timers = Timers()
        self.fwd = DnsForwarder(self.config, self.link, self.host,  # type: ignore[arg-type]
                                self.timers)
        self.fwd.upstreams = [UP1, UP2, UP3] if upstreams is None else upstreams
        self.now = 100.0

    def _sink(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self.frames.append(b"".join(bytes(p) for p in parts))

    def query(self, payload: bytes, sport: int = 40000, src: str = GUEST) -> None:
        raw = bytes(IP(src=src, dst="10.0.2.3") / UDP(sport=sport, dport=53) / payload)
        pkt = Ipv4Packet(memoryview(raw))
        self.fwd.handle_query(pkt, UdpDatagram(pkt.payload, pkt.src, pkt.dst, True), self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.timers.run(self.now)

    def answers(self) -> list[tuple[str, int, bytes]]:
        """What the guest received: (dst ip, dst port, DNS payload), and clear."""
        out = []
        for f in self.frames:
            e = EthernetFrame(memoryview(f))
            p = Ipv4Packet(e.payload)
            u = UdpDatagram(p.payload, p.src, p.dst, verify_checksum=True)
            assert (bytes(p.src), u.src_port) == (self.config.dns, 53)
            out.append((".".join(map(str, p.dst)), u.dst_port, bytes(u.payload)))
        self.frames.clear()
        return out

    def upstreams_asked(self) -> list[tuple[str, int]]:
        return [u for _, u, _ in self.host.sent]


def make_query(name: str = "example.com", qid: int = 0x1A2B, qtype: str = "A") -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def make_reply(query: bytes, rcode: int = 0, addr: str = "192.0.2.1") -> bytes:
    q = DNS(query)
    an = [DNSRR(rrname=q.qd[0].qname, rdata=addr)] if rcode == 0 else []
    return bytes(DNS(id=q.id, qr=1, rd=1, ra=1, rcode=rcode, qd=q.qd, an=an))


# ---- forwarding ------------------------------------------------------------------


def test_query_forwarded_verbatim_and_answer_returned() -> None:
    h = Harness()
    q = make_query()
    h.query(q, sport=40001)
    assert h.host.sent == [(h.fwd.pending[(bytes([10, 0, 2, 100]), 40001, 0x1A2B)], UP1, q)]
    query = h.host.sent[0][0]
    assert (query.guest_port, query.query_id, query.attempt) == (40001, 0x1A2B, 0)
    reply = make_reply(q)
    h.fwd.upstream_reply(query, reply, h.now)
    assert h.answers() == [(GUEST, 40001, reply)]
    assert h.host.cancelled == [query]
    assert h.fwd.pending == {}
    h.advance(10)  # the finished query's timer must not fire anything
    assert h.upstreams_asked() == [UP1] and h.answers() == []


def test_nxdomain_is_an_answer_not_a_failure() -> None:
    h = Harness()
    q = make_query("nope.invalid")
    h.query(q)
    nx = make_reply(q, rcode=dns.RCODE_NXDOMAIN)
    h.fwd.upstream_reply(h.host.sent[0][0], nx, h.now)
    assert h.answers() == [(GUEST, 40000, nx)]
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
    h.fwd.upstream_failed(query, h.now)  # UP2 unreachable
    assert h.upstreams_asked() == [UP1, UP2, UP3]
    assert h.answers() == []
    good = make_reply(q)
    h.fwd.upstream_reply(query, good, h.now)
    assert h.answers() == [(GUEST, 40000, good)]
    assert [d for _, _, d in h.host.sent] == [q, q, q]

    h2 = Harness()
    h2.query(q)
    query = h2.host.sent[0][0]
    h2.fwd.upstream_reply(query, make_reply(q, rcode=dns.RCODE_SERVFAIL), h2.now)
    h2.fwd.upstream_reply(query, make_reply(q, rcode=dns.RCODE_REFUSED), h2.now)
    assert h2.upstreams_asked() == [UP1, UP2, UP3]
    h2.fwd.upstream_reply(query, good, h2.now)
    assert h2.answers() == [(GUEST, 40000, good)]


def test_each_attempt_gets_its_own_timeout() -> None:
    h = Harness()
    h.query(make_query())
    h.advance(1.5)
    h.fwd.upstream_failed(h.host.sent[0][0], h.now)  # -> UP2 at t=1.5
    h.advance(1.9)
    assert h.upstreams_asked() == [UP1, UP2]
    h.advance(0.2)
    assert h.upstreams_asked() == [UP1, UP2, UP3]


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
    q = make_query()
    h.query(q)
    query = h.host.sent[0][0]
    refused = make_reply(q, rcode=dns.RCODE_REFUSED)
    h.fwd.upstream_reply(query, make_reply(q, rcode=dns.RCODE_SERVFAIL), h.now)
    h.fwd.upstream_reply(query, refused, h.now)
    assert h.answers() == [(GUEST, 40000, refused)]


def test_failures_reported_synchronously_by_the_runtime() -> None:
    # A runtime whose sendto fails at once (ENETUNREACH) reports it from inside dns_send.
    h = Harness()
    h.host.on_send = lambda query, upstream: h.fwd.upstream_failed(query, h.now, upstream)
    q = make_query()
    h.query(q)
    assert h.upstreams_asked() == [UP1, UP2, UP3]
    assert h.answers() == [(GUEST, 40000, dns.build_error_reply(q, dns.RCODE_SERVFAIL))]
    assert h.fwd.pending == {}


def test_late_failure_of_an_earlier_upstream_does_not_skip_the_current_one() -> None:
    h = Harness()
    q = make_query()
    h.query(q)
    query = h.host.sent[0][0]
    h.advance(2.1)  # now asking UP2
    h.fwd.upstream_failed(query, h.now, upstream=UP1)
    h.fwd.upstream_reply(query, make_reply(q, rcode=dns.RCODE_SERVFAIL), h.now, upstream=UP1)
    assert h.upstreams_asked() == [UP1, UP2]
    # ... but a late good answer from UP1 is used.
    good = make_reply(q)
    h.fwd.upstream_reply(query, good, h.now, upstream=UP1)
    assert h.answers() == [(GUEST, 40000, good)]


def test_upstream_list_change_does_not_affect_queries_in_flight() -> None:
    h = Harness()
    h.query(make_query())
    h.fwd.upstreams = [("127.0.0.99", 53)]
    h.advance(2.1)
    assert h.upstreams_asked() == [UP1, UP2]
    h.query(make_query(qid=2))
    assert h.upstreams_asked()[-1] == ("127.0.0.99", 53)


def test_no_upstreams_servfail_at_once() -> None:
    h = Harness(upstreams=[])
    q = make_query()
    h.query(q)
    assert h.answers() == [(GUEST, 40000, dns.build_error_reply(q, dns.RCODE_SERVFAIL))]
    assert h.host.sent == []


# ---- replies that are not for us -------------------------------------------------


@pytest.mark.parametrize("bad", [
    b"\x00",                                             # unreadable
    make_reply(make_query(qid=0x9999)),                  # other ID
    make_query(),                                        # not a response (QR=0)
    make_reply(make_query("evil.example")),              # other question
])
def test_mismatched_replies_are_ignored(bad: bytes) -> None:
    h = Harness()
    q = make_query()
    h.query(q)
    query = h.host.sent[0][0]
    h.fwd.upstream_reply(query, bad, h.now)
    assert h.answers() == [] and h.upstreams_asked() == [UP1]
    good = make_reply(q)
    h.fwd.upstream_reply(query, good, h.now)
    assert h.answers() == [(GUEST, 40000, good)]


def test_question_case_differs_in_reply_is_accepted() -> None:
    h = Harness()
    q = make_query("ExAmPlE.cOm")
    h.query(q)
    reply = make_reply(make_query("example.com"))
    h.fwd.upstream_reply(h.host.sent[0][0], reply, h.now)
    assert h.answers() == [(GUEST, 40000, reply)]


def test_reply_after_finish_is_dropped() -> None:
    h = Harness()
    q = make_query()
    h.query(q)
    query = h.host.sent[0][0]
    h.fwd.upstream_reply(query, make_reply(q), h.now)
    h.answers()
    h.fwd.upstream_reply(query, make_reply(q), h.now)
    h.fwd.upstream_failed(query, h.now)
    assert h.answers() == [] and h.upstreams_asked() == [UP1]


def test_reply_bigger_than_mtu_is_truncated() -> None:
    h = Harness(mtu=576)
    q = make_query("big.example", qtype="TXT")
    h.query(q)
    big = bytes(DNS(id=0x1A2B, qr=1, rd=1, ra=1, qd=DNSQR(qname="big.example", qtype="TXT"),
                    an=[DNSRR(rrname="big.example", type="TXT", rdata="x" * 200)] * 5))
    assert len(big) > 576 - 28
    h.fwd.upstream_reply(h.host.sent[0][0], big, h.now)
    [(_, _, data)] = h.answers()
    msg = dns.DnsMessage(data)
    assert msg.truncated and msg.id == 0x1A2B and msg.ancount == 0


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
    first = h.host.sent[0][0]
    h.fwd.upstream_reply(first, make_reply(first.data), h.now)
    h.query(make_query(qid=99))
    assert len(h.host.sent) == 4


def test_close_answers_everyone() -> None:
    h = Harness()
    h.query(make_query(qid=1))
    h.query(make_query(qid=2), sport=40001)
    h.fwd.close_all()
    got = sorted((port, dns.DnsMessage(d).rcode) for _, port, d in h.answers())
    assert got == [(40000, dns.RCODE_SERVFAIL), (40001, dns.RCODE_SERVFAIL)]
    assert len(h.host.cancelled) == 2 and h.fwd.pending == {}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=80))
def test_random_queries_and_replies_never_raise(query: bytes, reply: bytes) -> None:
    h = Harness()
    h.query(make_query()[:12] + query)
    h.query(query)
    for sent_query, _, _ in list(h.host.sent):
        h.fwd.upstream_reply(sent_query, make_reply(make_query())[:12] + reply, h.now)
        h.fwd.upstream_reply(sent_query, reply, h.now)
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
