"""TCP memory bounds: per-flow receive space, the stack-wide budget, inbound flow limits.

A guest here respects the window it is told (as a real one does), so what is
tested is what the engine *offers*; the host peers never read until a test lets
them, as a host socket whose peer stopped reading.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import pytest

from pyslirp.stack.tcp import ESTABLISHED, TcpConfig, TcpEngine, TcpFlow
from pyslirp.wire import tcp as wtcp
from tests.stack.fakes import FakeHost
from tests.stack.test_tcp import GUEST, REMOTE, A, Harness, M, Out, R, S

#: What CPython really spends per held 1-byte chunk: the object and its deque slot.
HEAP_PER_CHUNK = sys.getsizeof(b"x") + 8


def pattern(seed: int, n: int) -> bytes:
    """Deterministic stream content, so a byte in the wrong place shows."""
    return random.Random(seed).randbytes(n)


class Guest:
    """One guest connection: sends only within the window it was last told, resends
    what the engine did not acknowledge (as its retransmission would), and receives
    (acknowledging only when told to read)."""

    def __init__(self, h: Harness, flow: TcpFlow, ours: int, sport: int,
                 size: int = 5 << 20) -> None:
        self.h = h
        self.flow = flow
        self.sport = sport
        self.wscale = flow.rcv_wscale  # the scale our SYN-ACK announced
        self.start = self.una = self.nxt = h.gseq
        self.stream = pattern(sport, size)
        # The SYN-ACK's window (never scaled) was the last one told.
        self.right = (h.gseq + min(flow.cfg.rcv_buf, 0xFFFF)) & M
        self.windows: list[int] = []
        self.received = bytearray()
        self.rcv_start = self.rcv_nxt = self.ack = ours

    @property
    def room(self) -> int:
        r = (self.right - self.nxt) & M
        return 0 if r >= 0x80000000 else r

    @property
    def sent(self) -> int:
        """Bytes the engine acknowledged."""
        return (self.una - self.start) & M

    def hear(self, outs: list[Out]) -> None:
        for o in outs:
            if o.tcp is None or o.ip.dst != GUEST or o.tcp.dst_port != self.sport:
                continue
            if o.data and o.seq == self.rcv_nxt:
                self.received += o.data
                self.rcv_nxt = (self.rcv_nxt + len(o.data)) & M
            if o.flags & A:
                if 0 < ((o.ack - self.una) & M) < 0x80000000:
                    self.una = o.ack
                self.windows.append(o.tcp.window)
                self.right = (o.ack + (o.tcp.window << self.wscale)) & M

    def send(self, n: int) -> int:
        """Send up to ``n`` bytes the window allows (one segment); returns how many."""
        self.nxt = self.una  # resend what was not taken
        off = (self.nxt - self.start) & M
        n = min(n, self.room, len(self.stream) - off)
        if n:
            self.h.send(A, seq=self.nxt, ack=self.ack, data=self.stream[off:off + n],
                        sport=self.sport, window=4000)
            self.nxt = (self.nxt + n) & M
        return n

    def read_all(self) -> None:
        """The application read everything: acknowledge it."""
        self.ack = self.rcv_nxt
        self.h.send(A, seq=self.una, ack=self.ack, sport=self.sport, window=4000)


def open_guest(h: Harness, sport: int, wscale: int = 7) -> Guest:
    flow, ours = h.connect(wscale=wscale, sport=sport)
    return Guest(h, flow, ours, sport)


# ---------------------------------------------------------------- defect: window rounding

def test_sub_unit_segments_cannot_reopen_a_full_window() -> None:
    """A guest sending less than one window-scale unit per round toward a host
    that never reads: the window closes and the backlog stays within rcv_buf.

    (The window used to be rounded up to the scale unit, so each round reopened
    it: the backlog grew by a byte per round, past rcv_buf, without bound.)
    """
    h = Harness()  # default 4 MiB receive space, window scale 7 (128-byte unit)
    h.host.accept = 0
    g = open_guest(h, 40000)
    rcv_buf = g.flow.cfg.rcv_buf
    while g.room > 200:  # fill the window with full frames first, short of a unit
        g.send(min(65000, g.room - 100))
        g.hear(h.out())
    for _ in range(3000):  # then less than a unit per round, as long as the window lets it
        if not g.send(100):
            break
        g.hear(h.out())
    assert g.room == 0 and g.windows[-1] == 0, "the window never closed"
    flow = g.flow
    assert flow.backlog_len <= rcv_buf
    assert flow.backlog_len + len(flow.backlog) * HEAP_PER_CHUNK <= rcv_buf + (rcv_buf >> 4)
    # The host reads again: the window reopens and every byte arrives, in order.
    h.host.accept = None
    flow.host_writable(h.clock.now)
    g.hear(h.out())
    assert g.room > 0
    assert bytes(h.host.written[flow]) == g.stream[:g.sent]


def test_tiny_segments_are_charged_for_the_heap_they_take() -> None:
    """1-byte segments close the window when their *heap* fills rcv_buf, not after
    rcv_buf payload bytes (which is ~44 bytes of heap per byte)."""
    rcv_buf = 64 * 1024
    h = Harness(cfg=TcpConfig(rcv_buf=rcv_buf))
    h.host.accept = 0
    g = open_guest(h, 40000)
    for _ in range(5000):
        if not g.send(1):
            break
        g.hear(h.out())
    flow = g.flow
    assert g.room == 0 and g.windows[-1] == 0, "the window never closed"
    heap = flow.backlog_len + len(flow.backlog) * HEAP_PER_CHUNK
    assert heap <= rcv_buf + (rcv_buf >> 4), heap
    h.host.accept = None
    flow.host_writable(h.clock.now)
    assert bytes(h.host.written[flow]) == g.stream[:g.sent]


# ---------------------------------------------------------------- defect: no stack-wide limit

class RuntimeHost(FakeHost):
    """A FakeHost that also reads the host sockets as the runtime does: while reading
    is on, as much as ``host_read_budget()`` allows; stopping by itself at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.reading: set[TcpFlow] = set()
        self.fed: dict[TcpFlow, int] = {}
        #: Flows whose host peer does not read.
        self.stalled: set[TcpFlow] = set()

    def tcp_write(self, flow: Any, data: Any) -> int:
        if flow in self.stalled:
            self.calls.append(("tcp_write", flow, 0))
            return 0
        return super().tcp_write(flow, data)

    def tcp_pause_reading(self, flow: Any) -> None:
        super().tcp_pause_reading(flow)
        self.reading.discard(flow)

    def tcp_resume_reading(self, flow: Any) -> None:
        super().tcp_resume_reading(flow)
        self.reading.add(flow)

    def pump(self, h: Harness, flow: TcpFlow, stream: bytes) -> None:
        while flow in self.reading:
            budget = flow.host_read_budget()
            off = self.fed.get(flow, 0)
            if budget <= 0:
                self.reading.discard(flow)  # the runtime removes its reader
                return
            chunk = stream[off:off + min(budget, 65536)]
            if not chunk:
                return
            self.fed[flow] = off + len(chunk)
            flow.host_data(chunk, h.clock.now)
        h.engine.flush(h.clock.now)


def budget_harness(max_buffered: int, **cfg: int) -> Harness:
    h = Harness(cfg=TcpConfig(**cfg))
    h.config.max_buffered = max_buffered
    h.host = RuntimeHost()
    h.engine = TcpEngine(h.config, h.link, h.host, h.timers,
                         lambda ip, port: [("127.0.0.1", port)], h.engine.cfg)
    return h


class BudgetRig:
    """Guests on one engine with a small budget; the test decides who reads."""

    def __init__(self, budget: int, flows: int) -> None:
        self.budget = budget
        self.h = budget_harness(budget, rcv_buf=256 * 1024, snd_buf=256 * 1024)
        host = self.h.host
        assert isinstance(host, RuntimeHost)
        self.host = host
        self.engine = self.h.engine
        self.guests: list[Guest] = []
        for _ in range(flows):
            self.add_guest()

    def add_guest(self) -> Guest:
        g = open_guest(self.h, 41000 + len(self.guests))
        self.host.reading.add(g.flow)  # the runtime reads a socket once it connected
        g.flow.host_handle = pattern(len(self.guests), 1 << 20)  # what the host peer sends
        self.guests.append(g)
        return g

    def round_trip(self, readers: set[Guest]) -> None:
        """Every guest sends what its window allows and the host peers what the engine
        lets them; the guests in ``readers`` read what they received."""
        h, engine = self.h, self.engine
        for g in self.guests:
            g.send(65000)
            self.host.pump(h, g.flow, g.flow.host_handle)
            outs = h.out()
            for other in self.guests:
                other.hear(outs)
            if g in readers:
                g.read_all()
            assert engine.buffered <= self.budget
            assert engine.buffered == sum(f.buffered for f in engine.flows.values())

    def stall(self, rounds: int = 40) -> None:
        """Nobody reads, on either side."""
        self.host.stalled.update(g.flow for g in self.guests)
        for _ in range(rounds):
            self.round_trip(readers=set())

    def assert_intact(self, g: Guest, at_least: int) -> None:
        assert g.flow.state == ESTABLISHED
        assert g.sent >= at_least and len(g.received) >= at_least, (g.sent, len(g.received))
        assert bytes(self.host.written[g.flow]) == g.stream[:g.sent]
        assert bytes(g.received) == g.flow.host_handle[:len(g.received)]


def test_stalled_flows_cannot_buffer_past_the_stack_wide_budget() -> None:
    """Many flows whose host peers do not read and whose guest does not read: the
    total they hold stays within max_buffered, their windows close, host reads stop;
    once the peers read again every flow resumes and all data arrives intact."""
    rig = BudgetRig(1 << 20, flows=12)  # 12 x (256 KiB + 256 KiB) wanted: 6 MiB vs 1 MiB
    rig.stall()
    engine, host, guests = rig.engine, rig.host, rig.guests
    assert engine.buffered > rig.budget // 2, "the budget was not even used"
    heap = sum(f.backlog_len + len(f.backlog) * HEAP_PER_CHUNK + f.send_queue_len
               for f in engine.flows.values())
    assert heap <= rig.budget
    assert all(g.room == 0 and g.windows[-1] == 0 for g in guests), "windows stay open"
    assert all(f.host_read_budget() == 0 for f in engine.flows.values())
    assert not host.reading, "host sockets are still read"
    # The budget, not the flows' own buffers, closed the windows: no flow holds more
    # than one flow alone may.
    assert max(f.buffered for f in engine.flows.values()) <= engine.shared_limit

    # The host peers read again and the guest reads: everything resumes.
    host.stalled.clear()
    for g in guests:
        g.flow.host_writable(rig.h.clock.now)
    for _ in range(200):
        rig.round_trip(readers=set(guests))
        if all(g.sent >= 400_000 and len(g.received) >= 400_000 for g in guests):
            break
    for g in guests:
        rig.assert_intact(g, 400_000)


def test_stalled_flows_filling_the_budget_do_not_starve_a_well_behaved_one() -> None:
    """Past half the budget each flow still gets an even share of the rest, so a flow
    whose both ends read keeps moving data while stalled ones hold the budget."""
    rig = BudgetRig(1 << 20, flows=12)
    rig.stall()
    g = rig.add_guest()
    for _ in range(400):
        rig.round_trip(readers={g})
        if g.sent >= 300_000 and len(g.received) >= 300_000:
            break
    rig.assert_intact(g, 300_000)


def stall_one_after_another(rig: BudgetRig, flows: int) -> None:
    """Flows open and stall one at a time, so each grows while there are few flows
    (and their shares are large): together they take the whole budget."""
    for _ in range(flows):
        rig.add_guest()
        rig.stall(rounds=20)


@pytest.mark.parametrize("stalled", [6, 32])
@pytest.mark.parametrize("direction", ["upload", "download"])
def test_a_flow_opened_after_stalled_flows_took_the_budget_still_moves_data(
        direction: str, stalled: int) -> None:
    """Stalled flows (neither end reading) first take all they can of the budget;
    only then does a well-behaved flow open: it still gets room and completes its
    transfer, guest -> reading host peer (upload) or host -> reading guest
    (download), while the total stays within max_buffered.

    (Before, a flow arriving once the budget was full got a zero window and no
    host reads until some flow freed bytes, which stalled flows never do.)
    """
    rig = BudgetRig(1 << 20, flows=0)
    stall_one_after_another(rig, stalled)
    g = rig.add_guest()
    if direction == "upload":
        g.flow.host_handle = b""  # the host peer only reads
    else:
        g.stream = b""  # the guest only reads
    want = 400_000
    for _ in range(2000):
        rig.round_trip(readers={g})
        if direction == "upload" and g.sent >= want:
            break
        if direction == "download" and len(g.received) >= want:
            break
    assert g.flow.state == ESTABLISHED
    if direction == "upload":
        assert g.sent >= want, f"only {g.sent} bytes uploaded"
        assert bytes(rig.host.written[g.flow]) == g.stream[:g.sent]
    else:
        assert len(g.received) >= want, f"only {len(g.received)} bytes downloaded"
        assert bytes(g.received) == g.flow.host_handle[:len(g.received)]
    assert rig.engine.buffered <= rig.budget


def test_flows_held_back_by_the_whole_budget_resume_when_a_flow_leaves() -> None:
    """Stalled flows opened one after another hold all of the budget they may;
    when one of them is reset, what it held goes back to the flows the budget held
    back at once (their host sockets are read again), not only once the total has
    fallen far below the budget, which the others, stalled, never let it."""
    rig = BudgetRig(1 << 20, flows=0)
    stall_one_after_another(rig, 32)
    engine, host = rig.engine, rig.host
    assert not host.reading, "the budget held nobody back"
    held = engine.buffered
    gone = rig.guests.pop(0)
    freed = gone.flow.buffered
    assert freed > 0
    rig.h.send(R | A, seq=gone.nxt, ack=gone.ack, sport=gone.sport)
    assert gone.flow.key not in engine.flows
    assert host.reading, "no held-back flow was resumed"
    rig.stall(rounds=5)
    assert engine.buffered >= held - freed // 2, "the freed room stayed unused"
    assert engine.buffered <= rig.budget


# ---------------------------------------------------------------- defect: inbound flows skip limits

def test_inbound_half_open_flows_are_bounded() -> None:
    """Port-forward SYNs the guest does not answer stop at max_inbound_half_open."""
    h = Harness(cfg=TcpConfig(max_inbound_half_open=3, max_half_open=100))
    opened = [h.engine.open_to_guest(REMOTE, 5000 + i, GUEST, 8080, h.clock.now)
              for i in range(5)]
    assert sum(f is not None for f in opened) == 3
    assert h.link.counters["tcp.drop.inbound_max_half_open"] == 2
    # One is accepted by the guest: a slot frees up.
    syn = [o for o in h.out() if o.flags == S][0]
    h.send(S | A, seq=7000, ack=syn.seq + 1, sport=8080, dport=syn.tcp.src_port,  # type: ignore[union-attr]
           options=wtcp.syn_options(mss=1460, wscale=7))
    assert h.engine.open_to_guest(REMOTE, 6000, GUEST, 8080, h.clock.now) is not None


def test_inbound_flows_cannot_lock_the_guest_out_of_its_own_connections() -> None:
    """A host client filling the inbound allowance leaves the guest's outbound one alone
    (and the guest's flows do not eat into the inbound one)."""
    h = Harness(cfg=TcpConfig(max_flows=4, max_inbound_flows=3, max_inbound_half_open=3))
    for i in range(3):
        assert h.engine.open_to_guest(REMOTE, 5000 + i, GUEST, 8080, h.clock.now) is not None
    assert h.engine.open_to_guest(REMOTE, 5003, GUEST, 8080, h.clock.now) is None
    assert h.link.counters["tcp.drop.inbound_max_flows"] == 1
    h.out()
    flows = [h.connect(sport=40000 + i)[0] for i in range(4)]  # the guest's own four
    assert all(f.state == ESTABLISHED for f in flows)
    assert "tcp.drop.max_flows" not in h.link.counters
    h.send(S, sport=40010, options=wtcp.syn_options(mss=1460))
    assert h.link.counters["tcp.drop.max_flows"] == 1  # its own limit still holds
    assert h.engine.open_to_guest(REMOTE, 5004, GUEST, 8080, h.clock.now) is None


def test_inbound_limits_are_released_when_flows_end() -> None:
    h = Harness(cfg=TcpConfig(max_inbound_flows=2, max_inbound_half_open=2))
    a = h.engine.open_to_guest(REMOTE, 5000, GUEST, 8080, h.clock.now)
    b = h.engine.open_to_guest(REMOTE, 5001, GUEST, 8080, h.clock.now)
    assert a is not None and b is not None
    assert h.engine.open_to_guest(REMOTE, 5002, GUEST, 8080, h.clock.now) is None
    h.out()
    h.send(R | A, seq=0, ack=(a.iss + 1) & M, sport=8080, dport=5000)  # the guest refuses one
    assert h.engine.inbound == 1 and h.engine.inbound_half_open == 1
    assert h.engine.open_to_guest(REMOTE, 5002, GUEST, 8080, h.clock.now) is not None
    h.clock.advance(600)  # the others' SYNs time out
    assert len(h.engine) == 0
    assert h.engine.inbound == 0 and h.engine.inbound_half_open == 0 == h.engine.half_open
