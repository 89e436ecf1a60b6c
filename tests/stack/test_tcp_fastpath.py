"""Header prediction: the fast path (TcpFlow._receive, _xmit_fast) against the general one.

Two engines made alike (same random seed, same script) are brought to the same state;
then one segment goes through the fast path's entry (``_receive``) on one twin and
straight into the general path (``_segment``) on the other, and everything a user
could see afterwards must be equal: the flow's state, what went to the host, the
frames to the guest (byte for byte), the engine's budget. Segments of the common
case must not reach ``_segment`` at all, and every unusual one must: a spy on
``_segment`` fails a test if the fast path takes a segment it should not. Both
address families run every case (the engine and its fast path are the same).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from pyslirp.stack.config import NetConfig
from pyslirp.stack.rtt import RttEstimator
from pyslirp.stack.tcp import CLOSE_WAIT, ESTABLISHED, FIN_WAIT_1, TcpEngine, TcpFlow
from pyslirp.stack.timers import Timers
from pyslirp.wire import ipv4, ipv6
from pyslirp.wire import tcp as wtcp
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.ipv6 import Ipv6Packet
from tests.stack.fakes import FakeClock, FakeHost, make_link

S, A, F, R, P, U = wtcp.SYN, wtcp.ACK, wtcp.FIN, wtcp.RST, wtcp.PSH, wtcp.URG
M = 0xFFFFFFFF
ADDRS = {
    "ipv4": (bytes([10, 0, 2, 100]), bytes([93, 184, 216, 34])),
    "ipv6": (ipv6.addr_from_str("fd00::100"), ipv6.addr_from_str("2001:db8::34")),
}


class Side:
    """One TCP engine, its fake link and host, and a scripted guest on one flow."""

    def __init__(self, family: str, gseq: int, sack: bool,
                 on_synack: Callable[[TcpFlow], None] | None = None) -> None:
        self.v6 = family == "ipv6"
        self.guest, self.remote = ADDRS[family]
        self.config = NetConfig(vnet_hdr=True, offload=True)
        self.link, self.sink = make_link(self.config)
        self.host = FakeHost()
        self.timers = Timers()
        self.clock = FakeClock(self.timers)
        self.engine = TcpEngine(self.config, self.link, self.host, self.timers,
                                lambda ip, port: [("127.0.0.1", port)],
                                rng=random.Random(7))
        self.gseq = gseq  # the guest's next sequence number
        self.flow = self._connect(sack, on_synack)
        self.ours = self.flow.snd_nxt  # our next sequence number, as the guest saw it

    def packet(self, flags: int, seq: int, ack: int, data: bytes = b"", window: int = 502,
               options: bytes = b"") -> Ipv4Packet | Ipv6Packet:
        seg = bytes(wtcp.build(self.guest, self.remote, 40000, 80, seq & M, ack & M, flags,
                               window, data, options))
        if self.v6:
            head = bytearray(ipv6.HEADER_LEN)
            ipv6.build_header(head, 0, self.guest, self.remote, wtcp.PROTO, len(seg))
            return Ipv6Packet(memoryview(bytes(head) + seg))
        head = bytearray(20)
        ipv4.build_header(head, 0, self.guest, self.remote, wtcp.PROTO, len(seg))
        return Ipv4Packet(memoryview(bytes(head) + seg))

    def handle(self, pkt: Ipv4Packet | Ipv6Packet) -> None:
        """The packet as the stack hands it over, then the end of the batch."""
        if isinstance(pkt, Ipv6Packet):
            self.engine.handle6(pkt, self.clock.now, checksum_verified=True)
        else:
            self.engine.handle(pkt, self.clock.now, checksum_verified=True)
        self.engine.flush(self.clock.now)

    def enter(self, pkt: Ipv4Packet | Ipv6Packet, entry: str) -> None:
        """The packet into the flow's method ``entry`` (as handle() would), then flush."""
        engine = self.engine
        engine.cur_ip = pkt
        getattr(self.flow, entry)(wtcp.TcpSegment(pkt.payload), self.clock.now)
        engine.cur_ip = None
        engine.flush(self.clock.now)

    def send(self, flags: int, data: bytes = b"", **kw: Any) -> None:
        """The guest's next segment, acknowledging all it got; through handle()."""
        self.handle(self.packet(flags, kw.pop("seq", self.gseq), kw.pop("ack", self.ours),
                                data, **kw))
        self.gseq = (self.gseq + len(data)) & M

    def host_data(self, data: bytes) -> None:
        self.flow.host_data(data, self.clock.now)
        self.engine.flush(self.clock.now)
        self.ours = self.flow.snd_max

    def _connect(self, sack: bool, on_synack: Callable[[TcpFlow], None] | None) -> TcpFlow:
        self.handle(self.packet(S, self.gseq, 0, window=64240, options=wtcp.syn_options(
            mss=1460, wscale=7, sack_permitted=sack)))
        call = self.host.last("tcp_connect")
        assert call is not None
        flow: TcpFlow = call[1]
        flow.host_connected(self.clock.now)
        if on_synack is not None:
            on_synack(flow)
        self.sink.take()
        self.gseq = (self.gseq + 1) & M
        self.handle(self.packet(A, self.gseq, flow.iss + 1))
        assert flow.state in (ESTABLISHED, FIN_WAIT_1)
        #: What the guest's ACK of our SYN-ACK brought out.
        self.after_handshake = self.sink.take()
        self.host.calls.clear()
        return flow


def snapshot(side: Side) -> dict[str, Any]:
    """What the flow, the engine, the host and the guest have seen: everything but identity."""
    flow = side.flow
    parts = {"engine", "link", "host", "cfg", "host_handle", "rtt", "send_queue", "ooo",
             "backlog", "frame_ends"}
    state = {name: getattr(flow, name) for name in TcpFlow.__slots__ if name not in parts}
    state["rtt"] = [getattr(flow.rtt, name) for name in RttEstimator.__slots__]
    queue = flow.send_queue
    state["send_queue"] = (queue.acked_pos, queue.end_pos, [bytes(c) for c in queue.chunks])
    state["ooo"] = (dict(flow.ooo.segments), flow.ooo.nbytes)
    state["backlog"] = [bytes(c) for c in flow.backlog]
    state["frame_ends"] = list(flow.frame_ends)
    engine = side.engine
    state["budget"] = (engine.buffered, len(engine.dirty), len(engine.starved), len(engine))
    state["host_calls"] = [(c[0], *c[2:]) for c in side.host.calls]
    state["written"] = bytes(side.host.written[flow])
    state["frames"] = side.sink.take()
    state["counters"] = dict(side.link.counters)
    return state


Step = Callable[[Side], None]


def twins(family: str, prelude: Step | None = None, gseq: int = 1_000_000,
          sack: bool = False) -> tuple[Side, Side]:
    """Two engines in the same state: the same script, the same random seed."""
    sides = []
    for _ in range(2):
        side = Side(family, gseq, sack)
        if prelude is not None:
            prelude(side)
        sides.append(side)
    fast, general = sides
    assert snapshot(fast) == snapshot(general), "the twins drifted apart before the test"
    return fast, general


def spy_segment(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the general path (TcpFlow._segment)."""
    calls: list[int] = []
    general = TcpFlow._segment

    def spy(self: TcpFlow, seg: wtcp.TcpSegment, now: float) -> None:
        calls.append(seg.seq)
        general(self, seg, now)

    monkeypatch.setattr(TcpFlow, "_segment", spy)
    return calls


def compare(monkeypatch: pytest.MonkeyPatch, fast: Side, general: Side,
            make: Callable[[Side], Ipv4Packet | Ipv6Packet], expect_fast: bool) -> None:
    """``make``'s packet into _receive on one twin and _segment on the other: the same result,
    and _segment reached from _receive exactly when the segment is not the common case."""
    fast_pkt, general_pkt = make(fast), make(general)
    calls = spy_segment(monkeypatch)
    fast.enter(fast_pkt, "_receive")
    assert len(calls) == (0 if expect_fast else 1), (
        "the fast path took it" if calls == [] else "the fast path passed it on")
    general.enter(general_pkt, "_segment")
    assert snapshot(fast) == snapshot(general)


def data_in_flight(n: int) -> Step:
    """The host has sent ``n`` bytes the guest has not acknowledged yet."""
    def step(side: Side) -> None:
        side.flow.host_data(random.Random(3).randbytes(n), side.clock.now)
        side.engine.flush(side.clock.now)
        side.sink.take()
    return step


def then(*steps: Step) -> Step:
    def step(side: Side) -> None:
        for s in steps:
            s(side)
    return step


FAMILIES = ["ipv4", "ipv6"]


# ---------------------------------------------------------------- the common case


@pytest.mark.parametrize("family", FAMILIES)
def test_in_order_data_takes_the_fast_path_with_the_general_result(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, general = twins(family)
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A | P, s.gseq, s.ours, b"GET / HTTP/1.1\r\n"), True)
    assert fast.host.written[fast.flow] == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_data_that_acknowledges_our_data_takes_the_fast_path(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 1-byte round trip: the guest's byte carries the ACK of our echo."""
    fast, general = twins(family, data_in_flight(1))
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A | P, s.gseq, s.flow.snd_max, b"x"), True)
    assert fast.flow.snd_una == fast.flow.snd_max


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("part", [1, 1460, 5000, None])
def test_pure_ack_of_new_data_takes_the_fast_path(
        family: str, part: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Part of a flight (the retransmission timer restarts) or all of it; cwnd grows the same."""
    fast, general = twins(family, data_in_flight(200_000))
    compare(monkeypatch, fast, general, lambda s: s.packet(
        A, s.gseq, s.flow.snd_max if part is None else s.flow.snd_una + part, window=2000),
        True)
    assert fast.flow.snd_una != fast.flow.iss + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("window", [100, 3000, 0])
def test_pure_ack_that_moves_the_window_takes_the_fast_path(
        family: str, window: int, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, general = twins(family, data_in_flight(50_000))
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A, s.gseq, s.flow.snd_una + 1460, window=window), True)


@pytest.mark.parametrize("family", FAMILIES)
def test_ack_of_data_resent_after_a_timeout_takes_the_fast_path(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """All that was in flight was resent (snd_nxt is back at snd_max): the ACK ends the
    retransmission count and takes no RTT sample (Karn)."""
    def resent(side: Side) -> None:
        data_in_flight(100)(side)
        side.clock.advance(1.5)
        assert side.flow.retries > 0 and side.flow.snd_nxt == side.flow.snd_max
        side.sink.take()
    fast, general = twins(family, resent)
    compare(monkeypatch, fast, general, lambda s: s.packet(A, s.gseq, s.flow.snd_max), True)
    assert fast.flow.retries == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pure_ack_in_congestion_avoidance_takes_the_fast_path(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def past_slow_start(side: Side) -> None:
        side.flow.ssthresh = 2 * side.flow.mss
    fast, general = twins(family, then(past_slow_start, data_in_flight(20_000)))
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A, s.gseq, s.flow.snd_una + 2920), True)


@pytest.mark.parametrize("family", FAMILIES)
def test_data_the_host_takes_only_part_of_takes_the_fast_path(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_host(side: Side) -> None:
        side.host.accept = 5
    fast, general = twins(family, slow_host)
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A | P, s.gseq, s.ours, b"0123456789abcdef"), True)
    assert fast.flow.backlog_len == 11


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_wrap_is_handled_alike_on_both_paths(
        family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's data and our data both cross 2**32: every comparison is modular."""
    def our_iss_near_wrap(side: Side) -> None:
        flow = side.flow
        flow.snd_una = flow.snd_nxt = flow.snd_max = flow.recover = (M - 2)
        flow.snd_wl2 = M - 2
        side.ours = M - 2
    fast, general = twins(family, then(our_iss_near_wrap, data_in_flight(10)),
                          gseq=M - 6)
    compare(monkeypatch, fast, general,
            lambda s: s.packet(A | P, s.gseq, s.flow.snd_max, b"0123456789"), True)
    assert fast.flow.rcv_nxt == (M - 5 + 10) & M and fast.flow.snd_una == 7


def _small_frames_in_flight(side: Side) -> None:
    for _ in range(5):  # five frames: the duplicate-ACK threshold is 3 (RFC 5827)
        data_in_flight(1000)(side)


def _one_duplicate_ack(side: Side) -> None:
    _small_frames_in_flight(side)
    side.send(A, ack=side.flow.snd_una)
    assert side.flow.dupacks == 1


def _cwnd_at_its_cap(side: Side) -> None:
    side.flow.cwnd = side.flow.cfg.snd_buf - 100
    data_in_flight(20_000)(side)


def _reading_paused(side: Side) -> None:
    data_in_flight(5000)(side)
    side.flow.reading_paused = True  # as if the send queue had been full


def _starved(side: Side) -> None:
    data_in_flight(5000)(side)
    side.flow.reading_paused = True
    side.engine.starved[side.flow] = None  # as if the shared budget had held it back


COMMON_AFTER: dict[str, tuple[Step, Callable[[Side], Ipv4Packet | Ipv6Packet]]] = {
    "data after earlier data": (
        lambda s: s.send(A | P, b"first"), lambda s: s.packet(A | P, s.gseq, s.ours, b"2nd")),
    "ACK after a duplicate ACK": (
        _one_duplicate_ack, lambda s: s.packet(A, s.gseq, s.flow.snd_una + 1000, window=2000)),
    "ACK of a whole short flight": (
        data_in_flight(5000), lambda s: s.packet(A, s.gseq, s.flow.snd_max)),
    "ACK with cwnd at its cap": (
        _cwnd_at_its_cap, lambda s: s.packet(A, s.gseq, s.flow.snd_una + 2920)),
    "ACK that frees half the send queue": (
        _reading_paused, lambda s: s.packet(A, s.gseq, s.flow.snd_max)),
    "ACK that frees the shared budget": (
        _starved, lambda s: s.packet(A, s.gseq, s.flow.snd_max)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(COMMON_AFTER))
def test_the_common_case_after_a_prelude_takes_the_fast_path(
        family: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prelude, make = COMMON_AFTER[case]
    fast, general = twins(family, prelude)
    compare(monkeypatch, fast, general, make, True)


# ---------------------------------------------------------------- everything else


UNUSUAL: dict[str, tuple[Step | None, Callable[[Side], Ipv4Packet | Ipv6Packet]]] = {
    "out-of-order data": (None, lambda s: s.packet(A, s.gseq + 100, s.ours, b"later")),
    "old data (retransmission)": (
        lambda s: s.send(A | P, b"first"), lambda s: s.packet(A, s.gseq - 5, s.ours, b"first")),
    "data partly old": (
        lambda s: s.send(A | P, b"first"),
        lambda s: s.packet(A, s.gseq - 2, s.ours, b"stnext")),
    "data with a window change": (
        None, lambda s: s.packet(A | P, s.gseq, s.ours, b"data", window=400)),
    "data with FIN": (None, lambda s: s.packet(A | F, s.gseq, s.ours, b"bye")),
    "FIN alone": (None, lambda s: s.packet(A | F, s.gseq, s.ours)),
    "RST": (None, lambda s: s.packet(R | A, s.gseq, s.ours)),
    "RST in window": (None, lambda s: s.packet(R, s.gseq + 10, 0)),
    "SYN": (None, lambda s: s.packet(S | A, s.gseq, s.ours)),
    "URG": (None, lambda s: s.packet(A | U, s.gseq, s.ours, b"!")),
    "ECE": (None, lambda s: s.packet(A | wtcp.ECE, s.gseq, s.ours, b"e")),
    "no ACK flag": (None, lambda s: s.packet(P, s.gseq, 0, b"x")),
    "SACK blocks on a duplicate ACK": (
        data_in_flight(10_000),
        lambda s: s.packet(A, s.gseq, s.flow.snd_una, options=wtcp.sack_option(
            [((s.flow.snd_una + 2920) & M, (s.flow.snd_una + 4380) & M)]))),
    "SACK blocks on a new ACK": (
        data_in_flight(10_000),
        lambda s: s.packet(A, s.gseq, s.flow.snd_una + 1460, options=wtcp.sack_option(
            [((s.flow.snd_una + 2920) & M, (s.flow.snd_una + 4380) & M)]))),
    "timestamps option": (
        None, lambda s: s.packet(A | P, s.gseq, s.ours, b"ts", options=bytes(
            (1, 1, wtcp.OPT_TIMESTAMP, 10)) + bytes(8))),
    "duplicate ACK": (data_in_flight(10_000), lambda s: s.packet(A, s.gseq, s.flow.snd_una)),
    "ACK of nothing new, nothing in flight": (None, lambda s: s.packet(A, s.gseq, s.ours)),
    "ACK of data never sent": (
        data_in_flight(100), lambda s: s.packet(A, s.gseq, s.flow.snd_max + 1)),
    "old ACK": (None, lambda s: s.packet(A | P, s.gseq, s.ours - 1000, b"x")),
}


def _zero_window(side: Side) -> None:
    side.flow.rcv_adv = side.flow.rcv_nxt  # as if we had advertised a zero window


def _small_window(side: Side) -> None:
    side.flow.rcv_adv = side.flow.rcv_nxt + 100  # as if we had advertised 100 bytes


def _edge_behind(side: Side) -> None:
    side.flow.rcv_adv = (side.flow.rcv_nxt - 10) & M  # no window at all (_segment: 0)


def _ooo_held(side: Side) -> None:
    """Held past a 4-byte hole: the segment that fills it must release this too."""
    side.handle(side.packet(A, side.gseq + 4, side.ours, b"later"))
    side.sink.take()


def _backlog(side: Side) -> None:
    side.host.accept = 0
    side.send(A | P, b"stuck")
    side.sink.take()


def _recovering(side: Side) -> None:
    data_in_flight(30_000)(side)
    for _ in range(3):
        side.send(A, window=2000)
    assert side.flow.in_recovery
    side.sink.take()


def _after_rto(side: Side) -> None:
    data_in_flight(30_000)(side)
    side.clock.advance(1.5)
    assert side.flow.snd_nxt != side.flow.snd_max
    side.sink.take()


def _close_wait(side: Side) -> None:
    side.send(A | F)
    side.gseq = (side.gseq + 1) & M
    assert side.flow.state == CLOSE_WAIT
    side.sink.take()


UNUSUAL_STATE: dict[str, tuple[Step, Callable[[Side], Ipv4Packet | Ipv6Packet]]] = {
    "zero window probe": (_zero_window, lambda s: s.packet(A, s.gseq, s.ours, b"p")),
    "data past the window": (_small_window, lambda s: s.packet(A, s.gseq, s.ours, bytes(101))),
    "data when the window's edge is behind rcv_nxt": (
        _edge_behind, lambda s: s.packet(A, s.gseq, s.ours, b"x")),
    "data while out-of-order data is held": (
        _ooo_held, lambda s: s.packet(A | P, s.gseq, s.ours, b"fill")),
    "data while the backlog holds some": (
        _backlog, lambda s: s.packet(A | P, s.gseq, s.ours, b"more")),
    "new ACK during fast recovery": (
        _recovering, lambda s: s.packet(A, s.gseq, s.flow.snd_una + 1460, window=2000)),
    "new ACK after a retransmission timeout": (
        _after_rto, lambda s: s.packet(A, s.gseq, s.flow.snd_una + 1460)),
    "data after the guest's FIN": (
        _close_wait, lambda s: s.packet(A | P, s.gseq, s.ours, b"late")),
    "ACK after the guest's FIN": (
        then(_close_wait, data_in_flight(100)),
        lambda s: s.packet(A, s.gseq, s.flow.snd_max)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_an_unusual_segment_goes_to_the_general_path(
        family: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prelude, make = UNUSUAL[case]
    fast, general = twins(family, prelude, sack=case.startswith("SACK"))
    compare(monkeypatch, fast, general, make, False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(UNUSUAL_STATE))
def test_a_flow_in_an_unusual_state_goes_to_the_general_path(
        family: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prelude, make = UNUSUAL_STATE[case]
    fast, general = twins(family, prelude)
    compare(monkeypatch, fast, general, make, False)


# ---------------------------------------------------------------- the output half


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("flags", "plen"), [(A, 0), (A | P, 1), (A | P, 1460),
                                             (A, 30_000), (A | P | F, 3000), (A | F, 0)])
def test_the_fast_builder_makes_the_general_builders_frame(
        family: str, flags: int, plen: int) -> None:
    """_xmit_fast's one-pack template against _xmit, byte for byte (GSO frames too)."""
    fast, general = twins(family, data_in_flight(40_000))
    payload = random.Random(5).randbytes(plen)
    for side, build in ((fast, TcpFlow._xmit_fast), (general, TcpFlow._xmit)):
        parts: list[Any] = [memoryview(payload)] if plen else []
        build(side.flow, flags, side.flow.snd_una, parts, plen)
    frames = fast.sink.take(), general.sink.take()
    assert len(frames[0]) == 1 and frames[0] == frames[1]
    assert snapshot(fast) == snapshot(general)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fast_builder_leaves_a_link_without_offloads_to_the_general_one(
        family: str) -> None:
    fast, general = twins(family)
    for side in (fast, general):
        side.link.offload = False
    fast.flow._xmit_fast(A, fast.flow.snd_nxt, [], 0)
    general.flow._xmit(A, general.flow.snd_nxt, [], 0)
    frames = fast.sink.take()
    assert frames == general.sink.take() and len(frames) == 1


# ---------------------------------------------------------------- _output only when needed


def _window_of(window: int) -> Step:
    def step(side: Side) -> None:
        side.send(A, window=window)  # the guest's window: ``window`` << 7 bytes
    return step


def _large_windows(side: Side) -> None:
    side.flow.cwnd = 1 << 20
    side.send(A, window=4000)  # 512,000 bytes


OUTPUT_STATES: dict[str, Step | None] = {
    "idle": None,
    "windows larger than a frame": _large_windows,
    "a small window": _window_of(10),
    "a zero window": _window_of(0),
    "data in flight": data_in_flight(3000),
    "cwnd full": data_in_flight(20_000),
    "a frame in flight, a small window": then(data_in_flight(1000), _window_of(12)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state", sorted(OUTPUT_STATES))
@pytest.mark.parametrize("size", [1, 1459, 1460, 5000, 20_000, 70_000])
def test_host_data_and_flush_skip_only_an_output_that_sends_nothing(
        family: str, state: str, size: int) -> None:
    """host_data() and flush() leave out _output() when it would send nothing: with it
    called anyway (as before), the result is the same."""
    fast, general = twins(family, OUTPUT_STATES[state])
    data = random.Random(9).randbytes(size)
    for side, always in ((fast, False), (general, True)):
        flow, now = side.flow, side.clock.now
        flow.host_data(data, now)
        if always:
            flow._output(now, push=False)
        side.sink.take()  # (sent at once or not: flush follows in the same batch)
        if always:
            flow._output(now)
        side.engine.flush(now)
    assert snapshot(fast) == snapshot(general)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("data", [b"", b"bye"])
def test_host_eof_before_the_handshake_ends_sends_our_fin_with_the_last_ack(
        family: str, data: bytes) -> None:
    """The server answered (or not) and closed before the guest's ACK of our SYN-ACK: the
    FIN queued meanwhile goes out in the flush after that ACK, with nothing else to send."""
    def server_closes(flow: TcpFlow) -> None:
        if data:
            flow.host_data(data, 1000.0)
        flow.host_eof(1000.0)
    side = Side(family, 1_000_000, False, on_synack=server_closes)
    frames = [wtcp.TcpSegment(memoryview(f)[12 + 14 + (40 if side.v6 else 20):])
              for f in side.after_handshake]
    assert [(f.flags, bytes(f.payload)) for f in frames] == [
        (A | P | F, data) if data else (A | F, b"")]
    assert side.flow.state == FIN_WAIT_1
