"""The attachment's stack timer on uvloop's millisecond clock (runtime/attachment.py)."""

from __future__ import annotations

import types
from typing import Any

import uvloop

from pyslirp.runtime.attachment import Attachment, timer_tick_after


class _Stack:
    """Just the timer part of a Stack: one deadline, due once the clock reaches it."""

    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline
        self.runs = 0
        self.fired_at: float | None = None

    def next_deadline(self) -> float | None:
        return self.deadline

    def run_timers(self, now: float) -> None:
        self.runs += 1
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.fired_at = now

    def flush(self, now: float) -> None:
        pass


def _wakeups_for(offset: float) -> tuple[int, float, float]:
    loop = uvloop.new_event_loop()
    try:
        deadline = loop.time() + offset
        stack = _Stack(deadline)
        rig: Any = types.SimpleNamespace(stack=stack, loop=loop, _timer=None, _timer_at=None,
                                         _closed=False)
        rig.arm_timer = types.MethodType(Attachment.arm_timer, rig)
        rig._on_timer = types.MethodType(Attachment._on_timer, rig)
        rig.arm_timer()

        def done() -> None:
            if stack.fired_at is not None:
                loop.stop()
            else:
                loop.call_later(0.001, done)
        loop.call_soon(done)
        loop.run_forever()
        assert stack.fired_at is not None
        return stack.runs, deadline, stack.fired_at
    finally:
        loop.close()


def test_a_deadline_between_clock_ticks_wakes_the_loop_once() -> None:
    # Armed as is, a deadline 0.4 ms past a tick fired on the tick before it and re-armed
    # itself at once until the clock ticked past (hundreds of empty wake-ups).
    for offset in (0.0204, 0.0007, 0.0155):
        runs, deadline, fired_at = _wakeups_for(offset)
        assert runs == 1, f"{runs} wake-ups for one deadline (+{offset * 1000:.1f} ms)"
        assert fired_at >= deadline


def test_the_tick_after_is_past_the_deadline_and_within_a_millisecond() -> None:
    for deadline in (0.0, 1.0, 1.0004, 1.0005, 1.0009999, 12345.678, 0.1 + 0.2):
        tick = timer_tick_after(deadline)
        assert deadline < tick <= deadline + 0.001 + 1e-9
