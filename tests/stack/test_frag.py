"""Reassembler and send_fragmented: fragments as real stacks (scapy here) cut them.

Uses tests/stack/test_udp.py's harness (a real stack's link and timers, a fake clock).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror, fragment
from scapy.packet import Packet, Raw

from pyslirp.stack.frag import Reassembler, send_fragmented
from pyslirp.stack.timers import Timers
from pyslirp.wire.ipv4 import FLAG_DF, Ipv4Packet
from tests.stack.test_udp import GUEST, REMOTE, Harness


class FragHarness(Harness):
    def __init__(self, timers: bool = True, **kw: Any) -> None:
        engine_kw = {k: kw.pop(k) for k in ("max_packets", "max_fragments") if k in kw}
        super().__init__(**kw)
        # The stack's own reassembler unless a test asks for other limits or no timers.
        if engine_kw or not timers:
            self.stack.frag = Reassembler(self.link, self.timers if timers else None,
                                          **engine_kw)
        self.frag = self.stack.frag

    def add(self, pkt: Packet) -> bytes | None:
        return self.frag.add(self.ip_packet(pkt), self.now)


def datagram(size: int = 3000, ident: int = 4242, dport: int = 9) -> Packet:
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    return IP(src=GUEST, dst=REMOTE, id=ident) / UDP(sport=40000, dport=dport) / Raw(data)


def frags(pkt: Packet, size: int = 1480) -> list[Packet]:
    return list(fragment(pkt, fragsize=size))


def test_in_order() -> None:
    h = FragHarness()
    original = datagram()
    pieces = frags(original)
    assert len(pieces) == 3
    assert h.add(pieces[0]) is None
    assert h.add(pieces[1]) is None
    whole = h.add(pieces[2])
    assert whole == bytes(original)
    Ipv4Packet(memoryview(whole))   # header checksum valid
    assert len(h.frag) == 0


def test_out_of_order() -> None:
    h = FragHarness()
    original = datagram(5000)
    pieces = frags(original, 1000)
    random.Random(1).shuffle(pieces)
    results = [h.add(p) for p in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert results[-1] == bytes(original)


def test_last_fragment_first() -> None:
    h = FragHarness()
    original = datagram()
    pieces = frags(original)
    assert h.add(pieces[2]) is None
    assert h.add(pieces[0]) is None
    assert h.add(pieces[1]) == bytes(original)


def test_exact_duplicate_is_dropped_alone() -> None:
    h = FragHarness()
    original = datagram()
    a, b, c = frags(original)
    assert h.add(a) is None
    assert h.add(a) is None
    assert h.add(b) is None
    assert h.add(c) == bytes(original)
    assert h.counters["drop.frag.duplicate"] == 1


def test_interleaved_packets_are_kept_apart() -> None:
    h = FragHarness()
    one, two = datagram(3000, ident=1), datagram(3000, ident=2, dport=10)
    p1, p2 = frags(one), frags(two)
    out = [h.add(p) for pair in zip(p1, p2, strict=True) for p in pair]
    assert out[-2:] == [bytes(one), bytes(two)]


def test_dont_fragment_bit_survives_and_more_fragments_is_cleared() -> None:
    h = FragHarness()
    original = datagram()
    original.flags = "DF"
    pieces = frags(original)
    for p in pieces:
        p.flags = "DF+MF" if p.flags.MF else "DF"
    whole = None
    for p in pieces:
        whole = h.add(p)
    assert whole is not None
    assert Ipv4Packet(memoryview(whole)).flags_frag == FLAG_DF


def _cut(pkt: Packet, start: int, end: int, more: bool) -> Packet:
    """A hand-made fragment: payload bytes [start, end) of ``pkt``'s IP payload."""
    body = bytes(pkt[IP].payload)[start:end]
    return IP(src=pkt.src, dst=pkt.dst, id=pkt.id, proto=pkt.proto, frag=start // 8,
              flags="MF" if more else 0) / Raw(body)


def test_overlap_drops_the_whole_packet_and_its_later_fragments() -> None:
    h = FragHarness()
    original = datagram(3000)
    assert h.add(_cut(original, 0, 1480, True)) is None
    assert h.add(_cut(original, 1472, 2960, True)) is None   # overlaps by 8 bytes
    assert h.counters["drop.frag.overlap"] == 1
    assert h.add(_cut(original, 1480, 2960, True)) is None
    assert h.add(_cut(original, 2960, 3008, False)) is None
    assert h.add(_cut(original, 0, 1480, True)) is None
    assert h.counters["drop.frag.poisoned"] == 3


def test_same_offset_different_data_is_an_overlap() -> None:
    h = FragHarness()
    original = datagram(3000)
    first = _cut(original, 0, 1480, True)
    assert h.add(first) is None
    forged = first.copy()
    forged[Raw].load = b"\0" * 1480
    assert h.add(forged) is None
    assert h.counters["drop.frag.overlap"] == 1


def test_overlap_after_a_timeout_starts_afresh() -> None:
    h = FragHarness()
    original = datagram(3000)
    h.add(_cut(original, 0, 1480, True))
    h.add(_cut(original, 8, 1480, True))
    h.advance(31)
    assert [h.add(p) for p in frags(original)][-1] == bytes(original)


def test_oversize_is_dropped() -> None:
    h = FragHarness()
    head = IP(src=GUEST, dst=REMOTE, id=9, proto=17, flags="MF") / Raw(bytes(1480))
    tail = IP(src=GUEST, dst=REMOTE, id=9, proto=17, frag=(65536 - 1480) // 8) / Raw(bytes(1480))
    assert h.add(head) is None
    assert h.add(tail) is None
    assert h.counters["drop.frag.oversize"] == 1
    assert h.counters.get("drop.frag.timeout") is None


def test_largest_legal_packet_is_reassembled() -> None:
    h = FragHarness()
    original = IP(src=GUEST, dst=REMOTE, id=10) / UDP(sport=1, dport=2) / Raw(bytes(65507))
    whole = None
    for p in frags(original):
        whole = h.add(p)
    assert whole == bytes(original)


def test_misaligned_middle_fragment_is_malformed() -> None:
    h = FragHarness()
    original = datagram(3000)
    assert h.add(_cut(original, 0, 1001, True)) is None
    assert h.counters["drop.frag.malformed"] == 1


def test_conflicting_ends_are_malformed() -> None:
    h = FragHarness()
    original = datagram(3000)
    h.add(_cut(original, 2960, 3008, False))
    h.add(_cut(original, 1480, 1600, False))
    assert h.counters["drop.frag.malformed"] == 1


def test_timeout_counts_and_sends_time_exceeded_when_the_first_fragment_came() -> None:
    h = FragHarness()
    original = datagram()
    first, _, last = frags(original)
    h.add(first)
    h.add(last)
    h.advance(29)
    assert len(h.frag) == 1
    h.advance(2)
    assert len(h.frag) == 0
    assert h.counters["drop.frag.timeout"] == 1
    [err] = h.take()
    assert (err.src, err.dst, err[ICMP].type, err[ICMP].code) == (REMOTE, GUEST, 11, 1)
    assert (err[IPerror].id, err[UDPerror].sport, err[UDPerror].dport) == (4242, 40000, 9)


def test_timeout_without_the_first_fragment_sends_nothing() -> None:
    h = FragHarness()
    h.add(frags(datagram())[1])
    h.advance(31)
    assert h.counters["drop.frag.timeout"] == 1
    assert h.take() == []


def test_timeout_of_a_broadcast_packet_sends_nothing() -> None:
    h = FragHarness()
    pkt = IP(src=GUEST, dst="10.0.2.255", id=3) / UDP(sport=1, dport=2) / Raw(bytes(3000))
    h.add(frags(pkt)[0])
    h.advance(31)
    assert h.counters["drop.frag.timeout"] == 1
    assert h.take() == []


def test_expiry_without_timers_happens_on_add() -> None:
    h = FragHarness(timers=False)
    h.add(frags(datagram(ident=1))[1])
    h.now += 31
    h.add(frags(datagram(ident=2))[1])
    assert h.counters["drop.frag.timeout"] == 1
    assert len(h.frag) == 1


def test_table_limit_refuses_new_packets_but_keeps_old_ones() -> None:
    h = FragHarness(max_packets=2)
    one, two, three = (datagram(ident=i) for i in (1, 2, 3))
    p1, p2, p3 = frags(one), frags(two), frags(three)
    h.add(p1[0])
    h.add(p2[0])
    assert h.add(p3[0]) is None
    assert h.counters["drop.frag.table_full"] == 1
    assert h.add(p1[1]) is None and h.add(p1[2]) == bytes(one)
    assert [h.add(p) for p in p3][-1] == bytes(three)


def test_fragment_count_limit() -> None:
    h = FragHarness(max_fragments=4)
    original = datagram(3000)
    for p in frags(original, 512)[:5]:
        h.add(p)
    assert h.counters["drop.frag.too_many"] == 1


def test_not_a_fragment_is_returned_as_is() -> None:
    h = FragHarness()
    pkt = datagram(100)
    assert h.add(pkt) == bytes(pkt)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 3000), fragsize=st.sampled_from([8, 64, 576, 1480]),
       seed=st.integers(0, 2**32 - 1), dups=st.integers(0, 3))
def test_any_order_with_duplicates_reassembles_once(size: int, fragsize: int, seed: int,
                                                    dups: int) -> None:
    h = FragHarness()
    original = IP(src=GUEST, dst=REMOTE, id=seed & 0xFFFF, proto=17) / Raw(
        random.Random(seed).randbytes(size))
    pieces = frags(original, fragsize)
    rng = random.Random(seed)
    pieces += [rng.choice(pieces) for _ in range(dups)]
    rng.shuffle(pieces)
    results = [h.add(p) for p in pieces]
    if size <= fragsize:      # not fragmented at all: every copy passes through
        assert results == [bytes(original)] * len(pieces)
        return
    # The packet comes out exactly when the last distinct fragment arrives. (Duplicates
    # arriving after that may make it again, as a duplicated whole packet would.)
    seen: set[int] = set()
    distinct = len({p.frag for p in pieces})
    for piece, result in zip(pieces, results, strict=True):
        first_time = piece.frag not in seen
        seen.add(piece.frag)
        if first_time and len(seen) == distinct:
            assert result == bytes(original)
            break
        assert result is None


# ---- send_fragmented ----------------------------------------------------------------

@pytest.mark.parametrize("mtu, size", [(1500, 1472), (1500, 1481), (576, 5000), (68, 300)])
def test_send_fragmented_round_trips_through_the_reassembler(mtu: int, size: int) -> None:
    h = FragHarness(mtu=mtu)
    l4 = random.Random(size).randbytes(size)
    sent = send_fragmented(h.link, bytes([198, 18, 0, 1]), bytes([10, 0, 2, 100]), 17, l4)
    pieces = h.take()
    assert sent == len(pieces)
    assert all(len(p) <= mtu for p in pieces)
    assert all(p.id == pieces[0].id for p in pieces)
    if len(pieces) == 1:
        assert pieces[0].flags.DF and bytes(pieces[0].payload) == l4
        return
    assert [bool(p.flags.MF) for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert all(len(p.payload) % 8 == 0 for p in pieces[:-1])
    whole = None
    for p in pieces:
        whole = h.frag.add(Ipv4Packet(memoryview(bytes(p))), h.now)
    assert whole is not None and bytes(Ipv4Packet(memoryview(whole)).payload) == l4


def test_send_fragmented_refuses_more_than_an_ipv4_packet_holds() -> None:
    h = FragHarness()
    assert send_fragmented(h.link, bytes(4), bytes(4), 17, bytes(65516)) == 0
    assert h.counters["drop.tx.oversize"] == 1
    assert send_fragmented(h.link, bytes(4), bytes(4), 17, bytes(65515)) == 45


def test_reassembler_with_shared_timers_rearms_for_later_packets() -> None:
    timers = Timers()
    h = FragHarness()
    h.timers = timers
    h.frag = Reassembler(h.link, timers)
    h.add(frags(datagram(ident=1))[0])
    h.now += 20
    h.add(frags(datagram(ident=2))[0])
    h.now += 11
    timers.run(h.now)
    assert h.counters["drop.frag.timeout"] == 1 and len(h.frag) == 1
    h.now += 20
    timers.run(h.now)
    assert h.counters["drop.frag.timeout"] == 2 and len(h.frag) == 0
