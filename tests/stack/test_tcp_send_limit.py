"""The per-flow send limit: ``snd_buf``, grown while the guest's ACKs come late.

A download (host -> guest) on simulated time: the host peer always has data
(the runtime reads what ``host_read_budget()`` allows), and a fake guest
acknowledges each frame ``delay`` seconds after it was sent, with a window
far larger than any limit. So the flow is held by its send limit alone, and
its rate is limit / delay: what a download does while the guest's ACKs wait
behind a flood in the TAP's ring (issue 11).
"""

from __future__ import annotations

from collections import deque

import pytest

from pyslirp.stack.tcp import TcpConfig, TcpFlow
from tests.stack.test_tcp import GUEST, A, Harness, M
from tests.stack.test_tcp_memory import RuntimeHost, budget_harness

KIB = 1024
SND_BUF = 256 * KIB
SND_BUF_MAX = 1024 * KIB
TICK = 0.0005
#: What the host peer sends: one chunk over and over (the content is not the point).
CHUNK = bytes(64 * KIB)
WINDOW_SCALE = 9  # 65535 << 9: a 32 MiB window, never the limiter here


class LateGuest:
    """Acknowledges every frame ``delay`` seconds after the engine sent it; or, with
    ``capacity`` set, takes in ``capacity`` bytes a second and acknowledges each frame
    once it has taken it in (a rate held by the guest's side, not by ACKs' delay)."""

    def __init__(self, h: Harness, flow: TcpFlow, ours: int) -> None:
        self.h = h
        self.flow = flow
        self.rcv_nxt = self.last_ack = ours
        self.delay = 0.001
        self.capacity: float | None = None
        self.busy_until = 0.0
        #: (sequence number after the frame, when its ACK is due), oldest first.
        self.pending: deque[tuple[int, float]] = deque()
        self.acked = 0
        self.window = 0xFFFF

    def hear(self) -> None:
        for o in self.h.out():
            if o.tcp is None or o.ip.dst != GUEST or not o.data:
                continue
            if o.seq == self.rcv_nxt:
                self.rcv_nxt = (self.rcv_nxt + len(o.data)) & M
                now = self.h.clock.now
                if self.capacity is None:
                    due = now + self.delay
                else:
                    due = self.busy_until = max(now, self.busy_until) + len(o.data) / self.capacity
                self.pending.append((self.rcv_nxt, due))

    def ack_due(self) -> None:
        """One cumulative ACK for every frame whose ACK is due."""
        ack = None
        now = self.h.clock.now
        while self.pending and self.pending[0][1] <= now + 1e-9:
            ack = self.pending.popleft()[0]
        if ack is not None:
            self.acked += (ack - self.last_ack) & M
            self.last_ack = ack
            self.h.send(A, ack=ack, window=self.window)


class Download:
    """One guest connection downloading from a host peer that always has data."""

    def __init__(self, h: Harness) -> None:
        assert isinstance(h.host, RuntimeHost)
        self.h = h
        self.host = h.host
        flow, ours = h.connect(wscale=WINDOW_SCALE, mss=65000, window=0xFFFF)
        self.flow = flow
        self.guest = LateGuest(h, flow, ours)
        self.host.reading.add(flow)
        #: The largest send limit and the most the flow held, over the run.
        self.max_limit = flow.snd_limit
        self.max_buffered = 0
        self.limit_seconds = 0.0

    def run(self, seconds: float, delay: float = 0.001, capacity: float | None = None) -> int:
        """Run ``seconds`` of simulated time with ACKs ``delay`` late (or the guest
        taking in ``capacity`` bytes/s); bytes acknowledged. Notes the time-weighted
        send limit in ``limit_seconds``."""
        self.guest.delay = delay
        self.guest.capacity = capacity
        before = self.guest.acked
        for _ in range(round(seconds / TICK)):
            self.limit_seconds += self.flow.snd_limit * TICK
            self.h.clock.advance(TICK)
            self.guest.ack_due()
            self.pump()
            self.guest.hear()
            self.max_limit = max(self.max_limit, self.flow.snd_limit)
            self.max_buffered = max(self.max_buffered, self.flow.buffered)
        return self.guest.acked - before

    def pump(self) -> None:
        flow, h = self.flow, self.h
        while flow in self.host.reading:
            budget = flow.host_read_budget()
            if budget <= 0:
                self.host.reading.discard(flow)  # the runtime removes its reader
                break
            flow.host_data(CHUNK[:budget], h.clock.now)
        h.engine.flush(h.clock.now)


def download(max_buffered: int = 256 << 20, snd_buf_max: int = SND_BUF_MAX) -> Download:
    h = budget_harness(max_buffered, snd_buf=SND_BUF, snd_buf_max=snd_buf_max)
    return Download(h)


def test_send_limit_stays_at_snd_buf_while_acks_are_prompt() -> None:
    """A guest acknowledging every frame within a millisecond: the limit never grows,
    so an unloaded download keeps the short queue (and its cache footprint)."""
    d = download()
    d.run(1.0, delay=0.001)
    assert d.max_limit == SND_BUF
    assert d.max_buffered <= SND_BUF + len(CHUNK)
    assert "tcp.snd_limit.grown" not in d.h.link.counters


def test_send_limit_grows_while_acks_come_late_and_shrinks_when_they_are_prompt() -> None:
    """ACKs 8x later than the flow had them (a guest's flood ahead of them in the TAP's
    ring): the limit grows to snd_buf_max and the download gets back most of its rate;
    once the ACKs are prompt again the limit returns to snd_buf."""
    d = download()
    prompt = d.run(0.5, delay=0.001)
    held = d.run(0.4, delay=0.008)  # the limit grows within this span
    late = d.run(0.4, delay=0.008)
    assert d.flow.snd_limit == SND_BUF_MAX
    assert d.h.link.counters["tcp.snd_limit.grown"] >= 2
    # At snd_buf the late ACKs would allow snd_buf per 8 ms: the grown limit gives
    # several times that (snd_buf_max is 4x snd_buf).
    at_snd_buf = SND_BUF * 0.4 / 0.008
    assert late > 3 * at_snd_buf, (late, at_snd_buf, held, prompt)
    d.run(1.0, delay=0.001)
    assert d.flow.snd_limit == SND_BUF
    assert d.h.link.counters["tcp.snd_limit.shrunk"] >= 1


def test_a_grown_limit_that_does_not_raise_the_rate_is_taken_back() -> None:
    """The rate falls because the guest takes data in more slowly (as when the stack
    itself is short of CPU under a SYN flood), not because ACKs wait: the limit may
    try to grow, but a doubling that does not raise the rate is undone, and then it
    holds off; so the flow spends nearly all the time at snd_buf."""
    d = download()
    d.run(0.5, delay=0.001)  # the best rate: snd_buf per ms
    d.limit_seconds = 0.0
    d.run(4.0, capacity=SND_BUF / 0.004)  # a quarter of it, whatever the limit
    assert d.h.link.counters["tcp.snd_limit.grown"] >= 1
    assert d.flow.snd_limit == SND_BUF
    assert d.limit_seconds / 4.0 < 1.15 * SND_BUF, d.limit_seconds / 4.0 / SND_BUF


def test_send_limit_never_passes_the_flows_share_of_the_budget() -> None:
    """With a stack-wide budget whose share per flow (budget / 16) is below
    snd_buf_max, late ACKs grow the limit only up to that share, and what the flow
    holds stays within it."""
    budget = 8 << 20  # a share of 512 KiB: between snd_buf and snd_buf_max
    d = download(max_buffered=budget)
    share = budget // 16
    d.run(0.5, delay=0.001)
    d.run(1.0, delay=0.008)
    assert SND_BUF < d.max_limit <= share
    assert d.max_buffered <= share
    assert d.h.engine.buffered <= share


def test_send_limit_does_not_grow_when_the_guests_window_is_the_limiter() -> None:
    """Late ACKs but a guest window smaller than the send limit: a longer send queue
    could not put more in flight, so the limit stays."""
    d = download()
    d.guest.window = (SND_BUF // 2) >> WINDOW_SCALE
    d.run(0.5, delay=0.001)
    d.run(1.0, delay=0.008)
    assert d.max_limit == SND_BUF


def test_snd_buf_max_below_snd_buf_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"snd_buf_max \(1024\) must be at least snd_buf"):
        TcpConfig(snd_buf=4096, snd_buf_max=1024)
