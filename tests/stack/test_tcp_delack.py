"""Delayed ACKs toward the guest (tcp.py's module docstring, "Delayed ACKs").

The ACK of a short in-order segment waits up to ``TcpConfig.delayed_ack`` for the host's
reply to carry it; everything else is ACKed at the batch's end, as without the delay.
Times are the stack's own clock (FakeClock): the deadline is checked on either side of it.
Both address families run every case.
"""

from __future__ import annotations

import struct

import pytest

from pyslirp.stack.tcp import TcpConfig, TcpFlow
from pyslirp.wire import tcp as wtcp
from pyslirp.wire import vnet
from tests.stack.test_tcp_fastpath import FAMILIES, Side

A, P, F = wtcp.ACK, wtcp.PSH, wtcp.FIN
M = 0xFFFFFFFF
DELAY = TcpConfig().delayed_ack


def delayed(family: str, delay: float = DELAY) -> Side:
    side = Side(family, 1_000_000, sack=True, delayed_ack=delay)
    side.sink.take()
    return side


def segments(side: Side) -> list[tuple[int, int, bytes]]:
    """The frames sent to the guest since the last call, as (flags, ack, payload)."""
    out = []
    for frame in side.sink.take():
        ip = frame[vnet.HEADER_LEN + 14:]
        ihl = 40 if side.v6 else (ip[0] & 0xF) * 4
        tcp = ip[ihl:]
        ack, offset, flags = struct.unpack_from("!IBB", tcp, 8)
        out.append((flags, ack, bytes(tcp[(offset >> 4) * 4:])))
    return out


def pure_acks(side: Side) -> list[int]:
    """The ACK numbers of the frames since the last call, which must carry no data."""
    segs = segments(side)
    assert all(flags == A and not data for flags, _, data in segs), segs
    return [ack for _, ack, _ in segs]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_hosts_reply_carries_the_ack_of_a_short_segment(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"ping")
    assert bytes(side.host.written[side.flow]) == b"ping", "the data went to the host at once"
    assert segments(side) == [], "no ACK frame of its own"
    side.clock.advance(DELAY / 2)
    side.host_data(b"pong")
    assert segments(side) == [(A | P, side.gseq, b"pong")], "the reply acknowledges the ping"
    side.clock.advance(10 * DELAY)
    assert segments(side) == [], "nothing more: the deadline passed with no ACK owed"
    assert "tcp.delayed_ack" not in side.link.counters


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ack_goes_alone_at_the_deadline_when_the_host_is_silent(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"ping")
    side.clock.advance(DELAY * 0.99)
    assert segments(side) == [], "not before the deadline"
    side.clock.advance(DELAY * 0.02)
    assert pure_acks(side) == [side.gseq], "at the deadline"
    assert side.link.counters["tcp.delayed_ack"] == 1
    side.host_data(b"late pong")
    assert segments(side) == [(A | P, side.gseq, b"late pong")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_short_segment_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"one")
    side.send(A | P, b"two")
    assert pure_acks(side) == [side.gseq], "one ACK for both, at the second's batch end"
    side.clock.advance(10 * DELAY)
    assert segments(side) == [], "the deadline passes with nothing owed"


@pytest.mark.parametrize("family", FAMILIES)
def test_full_sized_segments_are_acked_at_the_batch_end(family: str) -> None:
    side = delayed(family)
    side.send(A, b"x" * side.flow.mss)
    assert pure_acks(side) == [side.gseq]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_sized_segment_after_a_short_one_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"short")
    side.send(A, b"x" * side.flow.mss)
    assert pure_acks(side) == [side.gseq]


@pytest.mark.parametrize("family", FAMILIES)
def test_out_of_order_data_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    expected = side.gseq
    side.send(A | P, b"later", seq=side.gseq + 100)
    segs = segments(side)
    assert [(flags, ack) for flags, ack, _ in segs] == [(A, expected)], "a duplicate ACK now"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_segment_with_fin_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    side.send(A | P | F, b"bye")
    assert pure_acks(side) == [side.gseq + 1], "the data and the FIN, at once"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fin_after_a_delayed_ack_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"last words")
    side.send(A | F)
    assert pure_acks(side) == [side.gseq + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_data_the_host_did_not_take_whole_is_acked_at_once(family: str) -> None:
    side = delayed(family)
    side.host.accept = 2
    side.send(A | P, b"stuck")
    assert pure_acks(side) == [side.gseq], "the window it shrank is told at once"


@pytest.mark.parametrize("family", FAMILIES)
def test_no_delay_when_it_is_configured_off(family: str) -> None:
    side = delayed(family, delay=0.0)
    side.send(A | P, b"ping")
    assert pure_acks(side) == [side.gseq]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flow_reset_with_an_ack_owed_sends_nothing_later(family: str) -> None:
    side = delayed(family)
    side.send(A | P, b"ping")
    side.send(wtcp.RST, seq=side.gseq)
    assert len(side.engine) == 0
    side.clock.advance(10 * DELAY)
    assert segments(side) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_steady_exchange_wakes_the_timer_at_most_once_per_deadline(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline shares the flow's heap entry, left stale when a reply carries the ACK:
    an exchange every 20 us wakes the flow once per deadline period, not per round trip,
    and no ACK goes alone."""
    side = delayed(family)
    wakeups: list[float] = []
    on_timer = TcpFlow.on_timer

    def spy(self: TcpFlow, now: float) -> None:
        wakeups.append(now)
        on_timer(self, now)

    monkeypatch.setattr(TcpFlow, "on_timer", spy)
    round_trips = 500  # 10 ms of them
    for _ in range(round_trips):
        side.send(A | P, b"q")
        side.clock.advance(10e-6)
        side.host_data(b"r")
        side.clock.advance(10e-6)
    segs = segments(side)
    assert len(segs) == round_trips and all(data == b"r" for _, _, data in segs), (
        "one frame per round trip, the reply carrying the ACK")
    assert "tcp.delayed_ack" not in side.link.counters
    periods = round_trips * 20e-6 / DELAY
    assert len(wakeups) <= periods + 1, f"{len(wakeups)} wake-ups in {periods:.0f} deadlines"


@pytest.mark.parametrize("family", FAMILIES)
def test_exchanges_slower_than_the_deadline_are_acked_at_once(family: str) -> None:
    """A delayed ACK would leave a stale heap entry per exchange (a wake-up each)."""
    side = delayed(family)
    for _ in range(3):
        side.clock.advance(2 * DELAY)
        side.send(A | P, b"q")
        assert pure_acks(side) == [side.gseq]
        side.host_data(b"r")
        assert segments(side) == [(A | P, side.gseq, b"r")]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flow_whose_delayed_ack_timed_out_delays_no_more(family: str) -> None:
    """A Nagle'd guest (write, write, read) waits for each ACK: it waits one deadline, once."""
    side = delayed(family)
    side.send(A | P, b"first")
    side.clock.advance(DELAY)
    assert pure_acks(side) == [side.gseq], "alone, at the deadline"
    for _ in range(3):
        side.send(A | P, b"next")
        assert pure_acks(side) == [side.gseq], "at once from now on"
    assert side.link.counters["tcp.delayed_ack"] == 1
