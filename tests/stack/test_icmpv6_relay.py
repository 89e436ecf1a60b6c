"""ICMPv6 echo to addresses other than ours, relayed through the host's ICMPv6 datagram
sockets by the same ICMP engine as IPv4 (pyslirp/stack/icmp.py), and what the guest
hears when the host or the policy refuses, or the host's socket reports an error."""

from __future__ import annotations

from typing import Any

from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrFragment,
    defragment6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from tests.stack import fakes
from tests.stack.test_ipv6_flows import GATEWAY, GUEST, send

REMOTE = "2001:db8::7"


class RefusingHost(fakes.FakeHost):
    """A host whose ping_group_range excludes us: no ICMPv6 datagram socket."""

    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Any) -> bool:
        super().icmp_echo(flow, dst, ident, seq, payload)
        return False


def harness(host: fakes.FakeHost | None = None, **cfg: Any) -> fakes.StackHarness:
    return fakes.StackHarness(host=host, enable_ipv6=True, **cfg)


def icmpv6_to_guest(h: fakes.StackHarness) -> list[Packet]:
    out = []
    for raw in h.replies():
        frame = Ether(raw)
        if IPv6 in frame and (frame[IPv6].nh == 58 or IPv6ExtHdrFragment in frame):
            out.append(frame)
    return out


def checksum_ok(pkt: Packet) -> bool:
    l4 = pkt[IPv6].payload
    stored = l4.cksum
    copy = pkt[IPv6].copy()
    del copy.payload.cksum
    return bool(IPv6(bytes(copy)).payload.cksum == stored)


def ping(h: fakes.StackHarness, dst: str = REMOTE, ident: int = 0x1234, seq: int = 1,
         data: bytes = b"abcdefgh") -> None:
    send(h, IPv6(src=GUEST, dst=dst) / ICMPv6EchoRequest(id=ident, seq=seq, data=data))


def test_echo_elsewhere_goes_through_the_host_and_the_reply_gets_the_guest_ident() -> None:
    h = harness()
    ping(h)
    call = h.host.last("icmp_echo")
    assert call is not None
    flow, dst, ident, seq, data = call[1:]
    assert flow.v6 and dst == REMOTE and (ident, seq, data) == (0x1234, 1, b"abcdefgh")
    h.stack.icmp.host_echo_reply(flow, 1, b"abcdefgh", h.now)
    [reply] = icmpv6_to_guest(h)
    assert (reply[IPv6].src, reply[IPv6].dst) == (REMOTE, GUEST)
    assert (reply[ICMPv6EchoReply].id, reply[ICMPv6EchoReply].seq) == (0x1234, 1)
    assert reply[ICMPv6EchoReply].data == b"abcdefgh"
    assert checksum_ok(reply)


def test_pings_to_the_gateway_are_still_answered_locally() -> None:
    h = harness()
    ping(h, GATEWAY)
    assert h.host.last("icmp_echo") is None
    [reply] = icmpv6_to_guest(h)
    assert ICMPv6EchoReply in reply and reply[IPv6].src == GATEWAY


def test_flows_are_per_ident_and_destination() -> None:
    h = harness()
    ping(h)
    ping(h, seq=2)
    assert len(h.stack.icmp) == 1
    ping(h, "2001:db8::8")
    assert len(h.stack.icmp) == 2


def test_host_refusing_icmpv6_sockets_gives_admin_prohibited() -> None:
    h = harness(host=RefusingHost())
    ping(h)
    [err] = icmpv6_to_guest(h)
    assert (err[ICMPv6DestUnreach].type, err[ICMPv6DestUnreach].code) == (1, 1)
    assert (err[IPv6].src, err[IPv6].dst) == (GATEWAY, GUEST)
    assert checksum_ok(err)
    assert h.counters["drop.icmp.host_refused"] == 1 and len(h.stack.icmp) == 0
    assert h.host.last("icmp_close") is not None


def test_refused_destinations_get_admin_prohibited_without_host_calls() -> None:
    h = harness()
    ping(h, "fd00::77")  # the rest of our prefix never reaches the host
    assert h.host.last("icmp_echo") is None
    [err] = icmpv6_to_guest(h)
    assert err[ICMPv6DestUnreach].code == 1
    assert h.counters["drop.icmp.policy"] == 1


def test_other_icmpv6_to_the_outside_is_dropped() -> None:
    h = harness()
    send(h, IPv6(src=GUEST, dst=REMOTE) / ICMPv6EchoReply(id=1, seq=1))
    assert icmpv6_to_guest(h) == [] and h.host.last("icmp_echo") is None
    assert h.counters["drop.icmp.type"] == 1


def test_host_errors_reach_the_guest_quoting_the_echo() -> None:
    h = harness()
    ping(h, seq=5)
    flow = h.host.last("icmp_echo")[1]
    h.stack.icmp.host_echo_error(flow, 5, 1, 3, h.now)   # address unreachable
    h.stack.icmp.host_echo_error(flow, 5, 3, 0, h.now)   # hop limit exceeded
    h.stack.icmp.host_echo_error(flow, 5, 2, 0, h.now, 1400)
    h.stack.icmp.host_echo_error(flow, 5, 4, 0, h.now)   # parameter problem: ours
    unreach, exceeded, too_big = icmpv6_to_guest(h)
    assert unreach[ICMPv6DestUnreach].code == 3
    assert ICMPv6TimeExceeded in exceeded
    assert too_big[ICMPv6PacketTooBig].mtu == 1400
    for err in (unreach, exceeded, too_big):
        assert checksum_ok(err)
        quoted = err[IPv6].payload.payload
        assert (quoted.src, quoted.dst) == (GUEST, REMOTE)
        assert (quoted[ICMPv6EchoRequest].id, quoted[ICMPv6EchoRequest].seq) == (0x1234, 5)
    assert h.counters["drop.icmp.host_error_ignored"] == 1


def test_big_reply_goes_to_the_guest_in_fragments() -> None:
    h = harness()
    ping(h)
    flow = h.host.last("icmp_echo")[1]
    data = bytes(range(256)) * 16
    h.stack.icmp.host_echo_reply(flow, 1, data, h.now)
    frames = icmpv6_to_guest(h)
    assert len(frames) == 3 and all(len(f) <= 1514 for f in frames)
    whole = IPv6(bytes(defragment6([f[IPv6] for f in frames])))
    assert whole[ICMPv6EchoReply].data == data


def test_multicast_and_unspecified_sources_are_not_relayed() -> None:
    h = harness()
    send(h, IPv6(src="::", dst=REMOTE) / ICMPv6EchoRequest(id=1, seq=1))
    assert h.host.last("icmp_echo") is None and icmpv6_to_guest(h) == []
    assert h.counters["drop.icmp.broadcast"] == 1
