"""UdpEngine: what a guest's UDP sockets see, and what the host is asked to do.

Guest frames are crafted with scapy and run through the engine of a real stack
(:class:`tests.stack.fakes.StackHarness`: its address policy, a fake clock, a fake
host, a link whose frames are collected), and what the guest gets is dissected again
with scapy (so our own parsers are not the judge of our own output).
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror, defragment
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from pyslirp.stack.udp import ICMP_ERROR_BURST, ICMP_ERROR_RATE, UdpEngine, UdpFlow
from pyslirp.wire.ipv4 import Ipv4Packet
from tests.stack import fakes

GUEST_MAC = bytes.fromhex("66696895ca9c")
GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
REMOTE = "198.18.0.1"


def addr(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


class FakeHost(fakes.FakeHost):
    """The shared recording host, with switches for the calls that can fail."""

    def __init__(self) -> None:
        super().__init__()
        self.udp_open_ok = True
        self.icmp_ok = True

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]

    def udp_open(self, flow: Any) -> bool:
        super().udp_open(flow)
        return self.udp_open_ok

    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Any) -> bool:
        super().icmp_echo(flow, dst, ident, seq, payload)
        return self.icmp_ok


class Harness(fakes.StackHarness):
    """The shared stack rig with a switchable host; replies dissected by scapy."""

    host: FakeHost

    def __init__(self, **cfg: Any) -> None:
        super().__init__(host=FakeHost(), guest_mac=GUEST_MAC, **cfg)

    def ip_packet(self, pkt: Packet) -> Ipv4Packet:
        return Ipv4Packet(memoryview(bytes(pkt)))

    def take(self) -> list[Packet]:
        """The frames sent to the guest since the last call, dissected by scapy."""
        out = []
        for f in self.replies():
            eth = Ether(f)
            assert eth.dst == ":".join(f"{b:02x}" for b in GUEST_MAC)
            out.append(eth[IP])
        return out


class UdpHarness(Harness):
    def __init__(self, **kw: Any) -> None:
        engine_kw = {k: kw.pop(k) for k in ("max_flows", "new_flows_per_second") if k in kw}
        super().__init__(**kw)
        # The stack's own engine unless a test sets limits; either way the stack's policy.
        if engine_kw:
            self.stack.udp = UdpEngine(self.config, self.link, self.host, self.timers,
                                       self.policy, **engine_kw)
        self.udp = self.stack.udp

    def send(self, dst: str, dport: int, payload: bytes = b"ping", sport: int = 40000,
             src: str = GUEST, verified: bool = False, pkt: Packet | None = None) -> None:
        if pkt is None:
            pkt = IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)
        self.udp.handle(self.ip_packet(pkt), self.now, verified)
        self.stack.flush(self.now)  # the end of the guest's batch: held datagrams go out

    def flow(self, sport: int = 40000, src: str = GUEST) -> UdpFlow:
        return self.udp.flows[(addr(src), sport)]


def udp_of(pkt: Packet) -> tuple[str, int, str, int, bytes]:
    """(src, sport, dst, dport, payload) of a packet, after checking both checksums."""
    ip_hdr = IP(bytes(pkt))
    sent_ip_csum, sent_udp_csum = ip_hdr.chksum, ip_hdr[UDP].chksum
    del ip_hdr.chksum, ip_hdr[UDP].chksum
    again = IP(bytes(ip_hdr))
    assert sent_ip_csum == again.chksum, "IP header checksum"
    assert sent_udp_csum == again[UDP].chksum, "UDP checksum"
    u = pkt[UDP]
    return pkt.src, u.sport, pkt.dst, u.dport, bytes(u.payload)


# ---- guest -> host --------------------------------------------------------------

def test_first_datagram_opens_one_socket_and_sends_to_translated_target() -> None:
    h = UdpHarness()
    h.send(GATEWAY, 5000, b"hello")
    h.send(REMOTE, 7, b"world")
    assert h.host.names() == ["udp_open", "udp_send", "udp_send"]
    flow = h.host.calls[0][1]
    assert h.host.calls[1] == ("udp_send", flow, ("127.0.0.1", 5000), b"hello")
    assert h.host.calls[2] == ("udp_send", flow, (REMOTE, 7), b"world")
    assert (flow.guest_ip, flow.guest_port) == (addr(GUEST), 40000)
    assert len(h.udp) == 1
    assert h.take() == []


def test_each_guest_port_gets_its_own_socket() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7, sport=40000)
    h.send(REMOTE, 7, sport=40001)
    h.send(REMOTE, 7, sport=40000)
    opened = [c[1] for c in h.host.of("udp_open")]
    assert [f.guest_port for f in opened] == [40000, 40001]
    assert [c[1] for c in h.host.of("udp_send")] == [opened[0], opened[1], opened[0]]


def test_refused_destination_is_dropped_silently() -> None:
    """slirp4netns's behaviour, as the engine issue asks: refused UDP is just dropped."""
    h = UdpHarness(disable_host_loopback=True)
    h.send(GATEWAY, 5000, sport=40000)
    h.send("10.0.2.3", 5353, sport=40001)
    h.send("127.0.0.1", 5000, sport=40002)
    assert h.host.calls == []
    assert h.counters["drop.udp.policy"] == 3
    assert h.take() == []


def test_refused_destination_on_an_existing_flow_sends_nothing() -> None:
    h = UdpHarness(disable_host_loopback=True)
    h.send(REMOTE, 7)
    h.send(GATEWAY, 5000)
    assert h.host.names() == ["udp_open", "udp_send"]
    assert h.counters["drop.udp.policy"] == 1
    assert h.take() == []


def test_host_refusing_a_socket_drops_and_retries_on_the_next_datagram() -> None:
    h = UdpHarness()
    h.host.udp_open_ok = False
    h.send(REMOTE, 7)
    assert h.host.names() == ["udp_open"]
    assert h.counters["drop.udp.open_failed"] == 1
    assert len(h.udp) == 0
    h.host.udp_open_ok = True
    h.send(REMOTE, 7)
    assert h.host.names() == ["udp_open", "udp_open", "udp_send"]


def test_bad_checksum_dropped_unless_the_link_verified_it() -> None:
    h = UdpHarness()
    pkt = IP(src=GUEST, dst=REMOTE) / UDP(sport=40000, dport=7, chksum=0x1234) / Raw(b"x")
    h.send(REMOTE, 7, pkt=pkt)
    assert h.host.calls == []
    assert h.counters["drop.malformed.udp"] == 1
    h.send(REMOTE, 7, pkt=pkt, verified=True)
    assert h.host.names() == ["udp_open", "udp_send"]


def test_zero_checksum_means_none() -> None:
    h = UdpHarness()
    pkt = IP(src=GUEST, dst=REMOTE) / UDP(sport=40000, dport=7, chksum=0) / Raw(b"x")
    h.send(REMOTE, 7, pkt=pkt)
    assert h.host.of("udp_send")[0][3] == b"x"


def test_truncated_datagram_is_counted_not_raised() -> None:
    h = UdpHarness()
    pkt = IP(src=GUEST, dst=REMOTE, proto=17) / Raw(b"\x9c\x40\x00\x07\x00\x30")
    h.send(REMOTE, 7, pkt=pkt)
    assert h.counters["drop.malformed.udp"] == 1
    assert h.host.calls == []


def test_broadcast_and_multicast_are_not_forwarded() -> None:
    h = UdpHarness()
    h.send("10.0.2.255", 137)
    h.send("255.255.255.255", 1900)
    h.send("239.255.255.250", 1900)
    assert h.host.calls == []
    assert h.counters["drop.udp.broadcast"] == 3


def test_port_zero_is_dropped() -> None:
    h = UdpHarness()
    h.send(REMOTE, 0)
    h.send(REMOTE, 7, sport=0)
    assert h.host.calls == []
    assert h.counters["drop.udp.bad_address"] == 2


# ---- host -> guest --------------------------------------------------------------

def test_reply_from_loopback_appears_from_the_gateway() -> None:
    h = UdpHarness(vnet_hdr=True)
    h.send(GATEWAY, 5000, b"q")
    flow = h.flow()
    h.udp.host_datagram(flow, "127.0.0.1", 5000, b"answer", h.now)
    [pkt] = h.take()
    assert udp_of(pkt) == (GATEWAY, 5000, GUEST, 40000, b"answer")


@pytest.mark.parametrize("link", [dict(vnet_hdr=False), dict(vnet_hdr=True, offload=False),
                                  dict(vnet_hdr=True, offload=True)])
@pytest.mark.parametrize("payload", [b"", b"x", b"odd length!", bytes(range(256)) * 5,
                                     b"\xff" * 1472])
def test_reply_checksums_in_every_link_mode(link: dict[str, bool], payload: bytes) -> None:
    h = UdpHarness(**link)
    h.send(REMOTE, 9)
    h.udp.host_datagram(h.flow(), REMOTE, 9, payload, h.now)
    [pkt] = h.take()
    assert udp_of(pkt) == (REMOTE, 9, GUEST, 40000, payload)
    assert pkt.flags.DF and pkt.ttl == 64


def test_reply_from_an_unknown_loopback_port_still_appears_from_the_gateway() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    h.udp.host_datagram(h.flow(), "127.0.0.1", 6000, b"x", h.now)
    [pkt] = h.take()
    assert udp_of(pkt)[:2] == (GATEWAY, 6000)


def test_reply_from_a_remote_appears_as_itself_even_if_never_contacted() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    h.udp.host_datagram(h.flow(), REMOTE, 7, b"echo", h.now)
    h.udp.host_datagram(h.flow(), "198.18.0.9", 3478, b"stun", h.now)
    a, b = h.take()
    assert udp_of(a) == (REMOTE, 7, GUEST, 40000, b"echo")
    assert udp_of(b) == ("198.18.0.9", 3478, GUEST, 40000, b"stun")


def test_reply_from_loopback_is_hidden_when_host_loopback_is_disabled() -> None:
    h = UdpHarness(disable_host_loopback=True)
    h.send(REMOTE, 7)
    h.udp.host_datagram(h.flow(), "127.0.0.1", 5000, b"x", h.now)
    assert h.take() == []
    assert h.counters["drop.udp.loopback_source"] == 1


def test_large_reply_is_fragmented_to_the_link_mtu() -> None:
    h = UdpHarness()
    h.send(REMOTE, 53)
    data = bytes(range(256)) * 16  # 4096 bytes: an EDNS0 answer
    h.udp.host_datagram(h.flow(), REMOTE, 53, data, h.now)
    frags = h.take()
    assert len(frags) == 3
    assert all(len(f) <= 1500 for f in frags)
    assert len({f.id for f in frags}) == 1
    assert [f.frag * 8 for f in frags] == [0, 1480, 2960]
    assert [bool(f.flags.MF) for f in frags] == [True, True, False]
    [whole] = defragment(frags)
    assert udp_of(IP(bytes(whole))) == (REMOTE, 53, GUEST, 40000, data)


def test_small_mtu_fragments_are_multiples_of_8() -> None:
    h = UdpHarness(mtu=576)
    h.send(REMOTE, 53)
    h.udp.host_datagram(h.flow(), REMOTE, 53, b"a" * 1200, h.now)
    frags = h.take()
    assert [f.frag * 8 for f in frags] == [0, 552, 1104]
    assert all(len(f) <= 576 for f in frags)


def test_reply_too_big_for_ipv4_is_dropped() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    h.udp.host_datagram(h.flow(), REMOTE, 7, bytes(65508), h.now)
    assert h.take() == []
    assert h.counters["drop.udp.oversize"] == 1
    h.udp.host_datagram(h.flow(), REMOTE, 7, bytes(65507), h.now)
    assert len(defragment(h.take())) == 1


def test_reply_before_the_guest_mac_is_known_is_counted() -> None:
    h = UdpHarness()
    h.link.guest_mac = None
    h.send(REMOTE, 7)
    h.udp.host_datagram(h.flow(), REMOTE, 7, b"x", h.now)
    assert h.frames == []
    assert h.counters["drop.tx.no_guest_mac"] == 1


# ---- ICMP errors from the host socket --------------------------------------------

def test_port_unreachable_comes_from_the_destination_and_quotes_the_datagram() -> None:
    h = UdpHarness()
    h.send(GATEWAY, 5000)
    h.udp.host_error(h.flow(), ("127.0.0.1", 5000), 3, 3, h.now)
    [pkt] = h.take()
    assert (pkt.src, pkt.dst) == (GATEWAY, GUEST)
    assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 3)
    quoted = pkt[IPerror]
    assert (quoted.src, quoted.dst, quoted.proto) == (GUEST, GATEWAY, 17)
    assert (pkt[UDPerror].sport, pkt[UDPerror].dport) == (40000, 5000)
    checked = ICMP(bytes(pkt[ICMP]))
    del checked.chksum
    assert ICMP(bytes(checked)).chksum == pkt[ICMP].chksum


def test_host_unreachable_comes_from_the_gateway() -> None:
    h = UdpHarness()
    h.send(REMOTE, 9, sport=41000)
    h.udp.host_error(h.flow(41000), (REMOTE, 9), 3, 1, h.now)
    [pkt] = h.take()
    assert (pkt.src, pkt[ICMP].type, pkt[ICMP].code) == (GATEWAY, 3, 1)
    assert (pkt[IPerror].dst, pkt[UDPerror].sport, pkt[UDPerror].dport) == (REMOTE, 41000, 9)
    h.udp.host_error(h.flow(41000), (REMOTE, 9), 3, 3, h.now)
    [pkt] = h.take()
    assert (pkt.src, pkt[ICMP].code) == (REMOTE, 3)


def test_ttl_exceeded_is_passed_on() -> None:
    h = UdpHarness()
    h.send(REMOTE, 33434)
    h.udp.host_error(h.flow(), (REMOTE, 33434), 11, 0, h.now)
    [pkt] = h.take()
    assert (pkt[ICMP].type, pkt[ICMP].code, pkt[UDPerror].dport) == (11, 0, 33434)


def test_frag_needed_and_unknown_types_are_not_passed_on() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    h.udp.host_error(h.flow(), (REMOTE, 7), 3, 4, h.now)
    h.udp.host_error(h.flow(), (REMOTE, 7), 5, 0, h.now)
    assert h.take() == []
    assert h.counters["drop.udp.host_error_ignored"] == 2


def test_icmp_errors_to_the_guest_are_rate_limited_as_linux_limits_its_own() -> None:
    # A guest sending to ever new closed ports gets at most a burst of errors, then
    # ICMP_ERROR_RATE a second (Linux's icmp_msgs_per_sec / icmp_msgs_burst).
    h = UdpHarness()
    h.send(GATEWAY, 5000)
    flood = 10 * ICMP_ERROR_BURST
    for _ in range(flood):
        h.udp.host_error(h.flow(), ("127.0.0.1", 5000), 3, 3, h.now)
    assert len(h.take()) == ICMP_ERROR_BURST
    assert h.counters["drop.udp.icmp_rate"] == flood - ICMP_ERROR_BURST
    # A second later a second's worth pass again (the burst caps what was saved up).
    h.now += 1.0
    for _ in range(flood):
        h.udp.host_error(h.flow(), ("127.0.0.1", 5000), 3, 3, h.now)
    assert len(h.take()) == ICMP_ERROR_BURST
    # Spread out at the rate, every one passes: a traceroute never meets the limit.
    h.now += 1.0
    for i in range(3 * ICMP_ERROR_BURST):
        h.now += 1.0 / ICMP_ERROR_RATE
        h.udp.host_error(h.flow(), (REMOTE, 33434 + i), 11, 0, h.now)
    assert len(h.take()) == 3 * ICMP_ERROR_BURST


def test_ignored_host_errors_spend_no_icmp_budget() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    for _ in range(2 * ICMP_ERROR_BURST):
        h.udp.host_error(h.flow(), (REMOTE, 7), 3, 4, h.now)  # fragmentation needed
    h.udp.host_error(h.flow(), (REMOTE, 7), 3, 3, h.now)
    assert len(h.take()) == 1
    assert "drop.udp.icmp_rate" not in h.counters


# ---- lifetime and limits ----------------------------------------------------------

def test_idle_flow_expires_after_240s_and_traffic_keeps_it() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7)
    flow = h.flow()
    h.udp.host_datagram(flow, REMOTE, 7, b"x", h.now)   # answered: the long timeout
    h.advance(200)
    h.udp.host_datagram(flow, REMOTE, 7, b"x", h.now)   # a reply counts as activity
    h.advance(200)
    assert "udp_close" not in h.host.names()
    h.send(REMOTE, 7)
    h.advance(239)
    assert "udp_close" not in h.host.names()
    h.advance(2)
    assert h.host.of("udp_close") == [("udp_close", flow)]
    assert len(h.udp) == 0 and flow.closed
    h.send(REMOTE, 7)
    assert h.host.names()[-2:] == ["udp_open", "udp_send"]


def test_flow_the_host_never_answered_expires_after_30s() -> None:
    """As conntrack's unreplied UDP entries: a flood of new flows nobody answers
    leaves the table in half a minute, not four."""
    h = UdpHarness()
    h.send(REMOTE, 7)
    h.advance(29)
    h.send(REMOTE, 7)   # the guest's own datagrams alone keep it a while longer
    h.advance(29)
    assert len(h.udp) == 1
    h.advance(2)
    assert len(h.udp) == 0
    assert h.host.names() == ["udp_open", "udp_send", "udp_send", "udp_close"]


def test_dns_only_flow_expires_after_10s() -> None:
    h = UdpHarness()
    h.send(REMOTE, 53)
    h.advance(9)
    assert len(h.udp) == 1
    h.advance(2)
    assert len(h.udp) == 0
    assert h.host.names() == ["udp_open", "udp_send", "udp_close"]


def test_flow_that_also_talks_to_other_ports_gets_the_long_timeout() -> None:
    h = UdpHarness()
    h.send(REMOTE, 53)
    h.send(REMOTE, 123)
    h.udp.host_datagram(h.flow(), REMOTE, 123, b"time", h.now)
    h.advance(11)
    assert len(h.udp) == 1
    h.advance(200)
    assert len(h.udp) == 1
    h.advance(30)
    assert len(h.udp) == 0


def test_reply_to_an_expired_flow_is_dropped() -> None:
    h = UdpHarness()
    h.send(REMOTE, 53)
    flow = h.flow()
    h.advance(11)
    h.udp.host_datagram(flow, REMOTE, 53, b"late", h.now)
    h.udp.host_error(flow, (REMOTE, 53), 3, 3, h.now)
    assert h.take() == []
    assert h.counters["drop.udp.closed_flow"] == 2


def test_flow_limit() -> None:
    """A table full of flows the host answered refuses new ones."""
    h = UdpHarness(max_flows=2)
    for port in (40000, 40001, 40002):
        h.send(REMOTE, 53, sport=port)
        if (addr(GUEST), port) in h.udp.flows:
            h.udp.host_datagram(h.flow(port), REMOTE, 53, b"answer", h.now)
    assert len(h.udp) == 2
    assert h.counters["drop.udp.flow_limit"] == 1
    assert len(h.host.of("udp_open")) == 2
    h.send(REMOTE, 53, sport=40000)   # existing flows still work
    assert len(h.host.of("udp_send")) == 3
    h.advance(11)
    h.send(REMOTE, 53, sport=40002)
    assert len(h.udp) == 1


def test_full_table_makes_room_by_evicting_the_oldest_flow_never_answered() -> None:
    """After a flood of flows nobody answers fills the table, a new flow still
    opens (in the place of the oldest unanswered one, as conntrack's early drop),
    and flows the host answered are kept.

    (Before, the table refused every new flow until the flood's flows idled out,
    240 s later.)
    """
    h = UdpHarness(max_flows=4)
    h.send(REMOTE, 7, sport=40000)
    answered = h.flow(40000)
    h.udp.host_datagram(answered, REMOTE, 7, b"pong", h.now)
    for port in (41000, 41001, 41002):   # the flood: nobody answers
        h.send(REMOTE, 9, sport=port)
    assert len(h.udp) == 4
    h.send(REMOTE, 7, sport=40001, payload=b"legit")
    assert len(h.udp) == 4
    assert h.host.of("udp_send")[-1][3] == b"legit"
    assert (addr(GUEST), 41000) not in h.udp.flows   # the oldest unanswered went
    assert h.counters["udp.flows_evicted"] == 1
    assert "drop.udp.flow_limit" not in h.counters
    for port in (40002, 40003, 40004):
        h.send(REMOTE, 7, sport=port)
    assert h.udp.flows[(addr(GUEST), 40000)] is answered and not answered.closed
    assert h.counters["udp.flows_evicted"] == 4
    # The new flow the host answers is kept too; the table full of answered flows
    # refuses the next one.
    for port in (40002, 40003, 40004):
        h.udp.host_datagram(h.flow(port), REMOTE, 7, b"pong", h.now)
    h.send(REMOTE, 7, sport=40005)
    assert h.counters["drop.udp.flow_limit"] == 1
    assert len(h.udp) == 4


def test_new_flow_rate_limit() -> None:
    h = UdpHarness(new_flows_per_second=5)
    for port in range(40000, 40010):
        h.send(REMOTE, 53, sport=port)
    assert len(h.udp) == 5
    assert h.counters["drop.udp.flow_rate"] == 5
    h.send(REMOTE, 53, sport=40000)   # not new: not limited
    assert h.counters["drop.udp.flow_rate"] == 5
    h.now += 0.5   # 2.5 tokens
    for port in range(40010, 40020):
        h.send(REMOTE, 53, sport=port)
    assert len(h.udp) == 7


def test_close_all_closes_every_socket() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7, sport=40000)
    h.send(REMOTE, 7, sport=40001)
    h.udp.close_all()
    assert len(h.host.of("udp_close")) == 2
    assert len(h.udp) == 0
    h.advance(1000)   # no timer fires for a closed flow
    assert len(h.host.of("udp_close")) == 2
