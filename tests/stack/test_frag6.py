"""IPv6 fragments: reassembly of the guest's (RFC 8200 4.5) through the whole stack, the
hostile cases (overlaps, floods, nesting, oversize), and fragments toward the guest.

Fragments are cut by scapy's ``fragment6``, as a guest kernel would; what reaches the
host is the UDP engine's ``udp_send``.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    defragment6,
    fragment6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from pyslirp.stack import frag
from tests.stack.test_ipv6_flows import GATEWAY, GUEST, harness, send

PAYLOAD = bytes(random.Random(13).randbytes(4000))


def udp6(payload: bytes = PAYLOAD, ident: int = 7, before: Packet | None = None,
         after: Packet | None = None) -> Packet:
    pkt: Packet = IPv6(src=GUEST, dst=GATEWAY)
    if before is not None:
        pkt = pkt / before
    pkt = pkt / IPv6ExtHdrFragment(id=ident)
    if after is not None:
        pkt = pkt / after
    return pkt / UDP(sport=5000, dport=7) / Raw(payload)


def sent_to_host(h: Any) -> list[bytes]:
    return [bytes(c[3]) for c in h.host.calls if c[0] == "udp_send"]


def to_guest(h: Any) -> list[Packet]:
    return [Ether(f) for f in h.replies()]


def test_fragments_in_any_order_reach_the_host_whole() -> None:
    h = harness()
    pieces = fragment6(udp6(), 1280)
    assert len(pieces) == 4
    for piece in reversed(pieces):
        send(h, piece)
    assert sent_to_host(h) == [PAYLOAD]
    assert len(h.stack.frag6) == 0


def test_extension_headers_before_and_after_the_fragment_header() -> None:
    h = harness()
    pkt = udp6(before=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), after=IPv6ExtHdrDestOpt())
    for piece in fragment6(pkt, 1280):
        send(h, piece)
    assert sent_to_host(h) == [PAYLOAD]


def test_atomic_fragment_is_handled_at_once() -> None:
    h = harness()
    send(h, udp6(b"small"))  # offset 0, M clear: RFC 6946
    assert sent_to_host(h) == [b"small"]
    assert len(h.stack.frag6) == 0


def test_duplicate_is_dropped_alone() -> None:
    h = harness()
    pieces = fragment6(udp6(), 1280)
    send(h, pieces[0])
    send(h, pieces[0])
    for piece in pieces[1:]:
        send(h, piece)
    assert sent_to_host(h) == [PAYLOAD]
    assert h.counters["drop.frag.duplicate"] == 1


def test_overlap_abandons_the_packet_and_its_remaining_fragments() -> None:
    h = harness()
    pieces = fragment6(udp6(), 1280)
    send(h, pieces[0])
    evil = pieces[1].copy()
    evil[IPv6ExtHdrFragment].offset -= 1  # 8 bytes over the first fragment's end
    send(h, evil)
    for piece in pieces[1:]:
        send(h, piece)
    assert sent_to_host(h) == []
    assert h.counters["drop.frag.overlap"] == 1
    assert h.counters["drop.frag.poisoned"] == len(pieces) - 1


def test_fragment_of_a_fragment_is_dropped() -> None:
    h = harness()
    inner = bytes(IPv6ExtHdrFragment(nh=17, id=9, m=1) / Raw(bytes(16)))
    pkt = IPv6(src=GUEST, dst=GATEWAY) / IPv6ExtHdrFragment(nh=44, id=8) / Raw(inner)
    send(h, pkt)
    assert h.counters["drop.frag.nested"] == 1
    assert sent_to_host(h) == []


def test_past_65535_bytes_of_payload_is_dropped() -> None:
    h = harness()
    last = IPv6(src=GUEST, dst=GATEWAY) / IPv6ExtHdrFragment(nh=17, id=3, offset=8180, m=0) \
        / Raw(bytes(200))
    send(h, last)
    assert h.counters["drop.frag.oversize"] == 1


def test_unfinished_packet_times_out_with_icmpv6_time_exceeded() -> None:
    h = harness()
    first = fragment6(udp6(), 1280)[0]
    send(h, first)
    h.advance(59)
    assert not [p for p in to_guest(h) if ICMPv6TimeExceeded in p]
    h.advance(2)
    [err] = [p for p in to_guest(h) if ICMPv6TimeExceeded in p]
    assert err[ICMPv6TimeExceeded].code == 1
    assert (err[IPv6].src, err[IPv6].dst) == (GATEWAY, GUEST)
    assert len(err[IPv6]) <= 1280
    assert h.counters["drop.frag.timeout"] == 1 and len(h.stack.frag6) == 0


def test_a_flood_of_first_fragments_is_bounded() -> None:
    h = harness()
    for ident in range(frag.DEFAULT_MAX_PACKETS + 50):
        send(h, fragment6(udp6(ident=ident), 1280)[0])
    assert len(h.stack.frag6) == frag.DEFAULT_MAX_PACKETS
    assert h.counters["drop.frag.table_full"] == 50
    # IPv4's table is apart: an IPv6 flood does not fill it.
    assert len(h.stack.frag) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8191), st.booleans(), st.integers(0, 1500),
                          st.integers(0, 3)), max_size=12))
def test_arbitrary_fragments_never_crash(pieces: list[tuple[int, bool, int, int]]) -> None:
    h = harness()
    for offset, more, size, ident in pieces:
        send(h, IPv6(src=GUEST, dst=GATEWAY)
             / IPv6ExtHdrFragment(nh=17, id=ident, offset=offset, m=int(more))
             / Raw(bytes(size)))
    assert not any(k.startswith("stack.error") for k in h.counters), h.counters


def test_big_ping_to_the_gateway_is_reassembled_and_answered_in_fragments() -> None:
    h = harness()
    ping = IPv6(src=GUEST, dst=GATEWAY) / IPv6ExtHdrFragment(id=11) \
        / ICMPv6EchoRequest(id=1, seq=1, data=PAYLOAD)
    for piece in fragment6(ping, 1500):
        send(h, piece)
    frames = [p for p in to_guest(h) if IPv6ExtHdrFragment in p]
    assert frames and all(len(f) <= 1514 for f in frames)
    whole = defragment6([f[IPv6] for f in frames])
    reply = IPv6(bytes(whole))
    assert reply[ICMPv6EchoReply].data == PAYLOAD


# ---- toward the guest -----------------------------------------------------------------

def test_udp_reply_larger_than_the_mtu_is_sent_as_ipv6_fragments() -> None:
    h = harness()
    send(h, IPv6(src=GUEST, dst=GATEWAY) / UDP(sport=5000, dport=7) / Raw(b"hi"))
    flow = h.host.last("udp_send")[1]
    h.stack.udp.host_datagram(flow, "::1", 7, PAYLOAD, h.now)
    frames = to_guest(h)
    assert len(frames) == 3 and all(len(f) <= 1514 for f in frames)
    assert {f[IPv6ExtHdrFragment].id for f in frames} == {frames[0][IPv6ExtHdrFragment].id}
    assert [f[IPv6ExtHdrFragment].m for f in frames] == [1, 1, 0]
    whole = IPv6(bytes(defragment6([f[IPv6] for f in frames])))
    assert (whole[UDP].sport, whole[UDP].dport) == (7, 5000)
    assert bytes(whole[UDP].payload) == PAYLOAD
    stored = whole[UDP].chksum
    del whole[UDP].chksum
    assert IPv6(bytes(whole))[UDP].chksum == stored
    assert "drop.udp.oversize6" not in h.counters


def test_first_fragment_that_splits_the_header_chain_is_dropped() -> None:
    """RFC 8200 4.5 / RFC 7112: every header through the upper-layer one in the first."""
    h = harness()
    split_tcp = IPv6(src=GUEST, dst=GATEWAY) / IPv6ExtHdrFragment(nh=6, id=21, m=1) \
        / Raw(bytes(8))  # 8 of the TCP header's 20 bytes
    send(h, split_tcp)
    chain = bytes(IPv6ExtHdrDestOpt(nh=17, len=2)) + bytes(16)  # 24 bytes, 16 here
    split_opts = IPv6(src=GUEST, dst=GATEWAY) / IPv6ExtHdrFragment(nh=60, id=22, m=1) \
        / Raw(chain[:16])
    send(h, split_opts)
    assert h.counters["drop.malformed.ipv6"] == 2
    assert len(h.stack.frag6) == 0
