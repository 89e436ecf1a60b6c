"""IcmpEngine: what ``ping`` in the guest sees, and what the host is asked to do.

Uses tests/stack/test_udp.py's harness (the stack's engine and address policy, a fake
host, a captured link, a fake clock).
"""

from __future__ import annotations

from typing import Any

from scapy.layers.inet import ICMP, IP, ICMPerror, IPerror, defragment, fragment
from scapy.packet import Packet, Raw

from pyslirp.stack.icmp import ADMIN_PROHIBITED, IcmpEngine, IcmpFlow
from tests.stack.test_udp import GATEWAY, GUEST, REMOTE, Harness

DNS = "10.0.2.3"


class IcmpHarness(Harness):
    def __init__(self, **kw: Any) -> None:
        engine_kw = {k: kw.pop(k) for k in ("max_flows",) if k in kw}
        super().__init__(**kw)
        if engine_kw:
            self.stack.icmp = IcmpEngine(self.config, self.link, self.host, self.timers,
                                         self.policy, **engine_kw)
        self.icmp = self.stack.icmp

    def ping(self, dst: str, ident: int = 0x77, seq: int = 1, payload: bytes = b"abcdefgh",
             src: str = GUEST, verified: bool = False, pkt: Packet | None = None) -> None:
        if pkt is None:
            pkt = IP(src=src, dst=dst) / ICMP(type=8, id=ident, seq=seq) / Raw(payload)
        self.icmp.handle(self.ip_packet(pkt), self.now, verified)

    def only_flow(self) -> IcmpFlow:
        [flow] = self.icmp.flows.values()
        return flow


def assert_icmp_checksum(pkt: Packet) -> None:
    again = ICMP(bytes(pkt[ICMP]))
    sent = again.chksum
    del again.chksum
    assert ICMP(bytes(again)).chksum == sent


def test_ping_to_the_gateway_and_dns_is_answered_locally() -> None:
    h = IcmpHarness()
    h.ping(GATEWAY, ident=0x1234, seq=7, payload=b"0123456789")
    h.ping(DNS, ident=0x1234, seq=8)
    a, b = h.take()
    assert (a.src, a.dst, a[ICMP].type, a[ICMP].id, a[ICMP].seq) == (GATEWAY, GUEST, 0,
                                                                      0x1234, 7)
    assert bytes(a[ICMP].payload) == b"0123456789"
    assert (b.src, b[ICMP].seq) == (DNS, 8)
    assert (a.ttl, b.ttl) == (255, 255)  # slirp4netns's ping shows ttl=255
    assert_icmp_checksum(a)
    assert h.host.calls == []


def test_gateway_answers_ping_even_with_host_loopback_disabled() -> None:
    h = IcmpHarness(disable_host_loopback=True)
    h.ping(GATEWAY)
    [reply] = h.take()
    assert (reply.src, reply[ICMP].type) == (GATEWAY, 0)


def test_large_ping_to_the_gateway_is_answered_in_fragments() -> None:
    h = IcmpHarness()
    data = bytes(range(256)) * 12
    h.ping(GATEWAY, payload=data)
    frags = h.take()
    assert len(frags) == 3
    [whole] = defragment(frags)
    assert bytes(IP(bytes(whole))[ICMP].payload) == data


def test_ping_elsewhere_goes_through_the_host_and_the_reply_gets_the_guest_ident() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, ident=0x4242, seq=1, payload=b"data")
    [call] = h.host.calls
    assert call[0] == "icmp_echo" and call[2:] == (REMOTE, 0x4242, 1, b"data")
    flow = call[1]
    assert h.take() == []
    # The host's ping socket uses its own identifier; the reply gets the guest's back.
    h.icmp.host_echo_reply(flow, 1, b"data", h.now)
    [reply] = h.take()
    assert (reply.src, reply.dst, reply[ICMP].type) == (REMOTE, GUEST, 0)
    assert (reply[ICMP].id, reply[ICMP].seq, bytes(reply[ICMP].payload)) == (0x4242, 1, b"data")
    assert_icmp_checksum(reply)


def test_flows_are_per_ident_and_destination() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, ident=1, seq=1)
    h.ping(REMOTE, ident=1, seq=2)
    h.ping(REMOTE, ident=2, seq=1)
    h.ping("198.18.0.2", ident=1, seq=1)
    flows = [c[1] for c in h.host.of("icmp_echo")]
    assert flows[0] is flows[1]
    assert len({id(f) for f in flows}) == 3
    assert len(h.icmp) == 3


def test_host_refusing_ping_sockets_gives_admin_prohibited() -> None:
    h = IcmpHarness()
    h.host.icmp_ok = False
    h.ping(REMOTE, ident=0x99, seq=5)
    [err] = h.take()
    assert (err.src, err.dst) == (GATEWAY, GUEST)
    assert (err[ICMP].type, err[ICMP].code) == (3, ADMIN_PROHIBITED)
    assert (err[IPerror].src, err[IPerror].dst) == (GUEST, REMOTE)
    assert (err[ICMPerror].type, err[ICMPerror].id, err[ICMPerror].seq) == (8, 0x99, 5)
    assert_icmp_checksum(err)
    assert len(h.icmp) == 0
    assert h.counters["drop.icmp.host_refused"] == 1
    # Whatever the runtime made for the failed flow is released at once, and only once.
    assert h.host.names() == ["icmp_echo", "icmp_close"]
    h.advance(3600)
    assert h.host.names() == ["icmp_echo", "icmp_close"]


def test_failed_echo_on_an_established_flow_keeps_the_flow() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, seq=1)
    h.host.icmp_ok = False
    h.ping(REMOTE, seq=2)
    [err] = h.take()
    assert (err[ICMP].code, err[ICMPerror].seq) == (ADMIN_PROHIBITED, 2)
    assert len(h.icmp) == 1 and "icmp_close" not in h.host.names()


def test_refused_destinations_get_admin_prohibited_without_host_calls() -> None:
    h = IcmpHarness()
    h.ping("10.0.2.50")
    h.ping("127.0.0.1")
    errs = h.take()
    assert [(e[ICMP].type, e[ICMP].code) for e in errs] == [(3, 13), (3, 13)]
    assert [e[IPerror].dst for e in errs] == ["10.0.2.50", "127.0.0.1"]
    assert h.host.calls == []
    assert h.counters["drop.icmp.policy"] == 2


def test_broadcast_ping_is_ignored() -> None:
    h = IcmpHarness()
    h.ping("10.0.2.255")
    h.ping("224.0.0.1")
    assert h.take() == [] and h.host.calls == []
    assert h.counters["drop.icmp.broadcast"] == 2


def test_other_icmp_types_from_the_guest_are_counted_and_dropped() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, pkt=IP(src=GUEST, dst=REMOTE) / ICMP(type=0, id=1, seq=1))
    h.ping(REMOTE, pkt=IP(src=GUEST, dst=GATEWAY) / ICMP(type=3, code=3) / IPerror(
        src=GATEWAY, dst=GUEST))
    h.ping(REMOTE, pkt=IP(src=GUEST, dst=GATEWAY) / ICMP(type=13))
    assert h.take() == [] and h.host.calls == []
    assert h.counters["drop.icmp.type"] == 3


def test_bad_checksum_dropped_unless_verified() -> None:
    h = IcmpHarness()
    pkt = IP(src=GUEST, dst=GATEWAY) / ICMP(type=8, id=1, seq=1, chksum=0xBEEF) / Raw(b"x")
    h.ping(GATEWAY, pkt=pkt)
    assert h.take() == []
    assert h.counters["drop.malformed.icmp"] == 1
    h.ping(GATEWAY, pkt=pkt, verified=True)
    assert len(h.take()) == 1


def test_truncated_icmp_is_counted_not_raised() -> None:
    h = IcmpHarness()
    h.ping(GATEWAY, pkt=IP(src=GUEST, dst=GATEWAY, proto=1) / Raw(b"\x08\x00\x00"))
    assert h.take() == []
    assert h.counters["drop.malformed.icmp"] == 1


def test_idle_flow_expires_after_60s_and_traffic_keeps_it() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, seq=1)
    flow = h.only_flow()
    h.advance(50)
    h.icmp.host_echo_reply(flow, 1, b"", h.now)
    assert len(h.take()) == 1
    h.advance(50)
    h.ping(REMOTE, seq=2)
    h.advance(59)
    assert "icmp_close" not in h.host.names()
    h.advance(2)
    assert h.host.of("icmp_close") == [("icmp_close", flow)]
    assert len(h.icmp) == 0
    h.icmp.host_echo_reply(flow, 2, b"", h.now)
    assert h.take() == []
    assert h.counters["drop.icmp.closed_flow"] == 1


def test_host_side_error_is_reported_quoting_the_echo() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, ident=0x55, seq=9)
    h.icmp.host_echo_error(h.only_flow(), 9, 11, 0, h.now)
    [err] = h.take()
    assert (err.src, err[ICMP].type, err[ICMP].code) == (GATEWAY, 11, 0)
    assert (err[IPerror].dst, err[ICMPerror].id, err[ICMPerror].seq) == (REMOTE, 0x55, 9)


def test_flow_limit() -> None:
    h = IcmpHarness(max_flows=2)
    for ident in (1, 2, 3):
        h.ping(REMOTE, ident=ident)
    assert len(h.icmp) == 2
    assert h.counters["drop.icmp.flow_limit"] == 1
    assert len(h.host.of("icmp_echo")) == 2


def test_close_all() -> None:
    h = IcmpHarness()
    h.ping(REMOTE, ident=1)
    h.ping(REMOTE, ident=2)
    h.icmp.close_all()
    assert len(h.host.of("icmp_close")) == 2 and len(h.icmp) == 0


def test_fragmented_ping_must_be_reassembled_first() -> None:
    h = IcmpHarness()
    pkt = IP(src=GUEST, dst=GATEWAY) / ICMP(type=8) / Raw(bytes(3000))
    first = fragment(pkt, fragsize=1480)[0]
    h.ping(GATEWAY, pkt=first)
    assert h.take() == []
    assert h.counters["drop.icmp.fragment"] == 1
