"""One deadline heap shared by every engine of a stack.

Theory of operation
-------------------
An engine object that wants to be woken has an ``on_timer(now)`` method and
calls :meth:`Timers.schedule` with a deadline. Rescheduling pushes a new entry;
stale entries are skipped when popped (the object's ``timer_deadline`` no longer
matches), so rescheduling costs O(log n) and cancelling is O(1). The runtime
asks :meth:`next_deadline` after each batch of work and arms one loop timer.

A stale entry far in the future (a closed connection's keepalive, 10 minutes
out) would otherwise keep its object alive until then: under connection churn
that is megabytes per second of dead flows. So the heap is rebuilt without its
stale entries once they are more than half of it (O(n), amortised over the n/2
reschedules and cancels that made them stale).
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol


class TimerClient(Protocol):
    timer_deadline: float | None

    def on_timer(self, now: float) -> None: ...


#: Below this many stale entries the heap is never rebuilt (not worth it).
_COMPACT_MIN = 256


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerClient]] = []
        self._counter = itertools.count()
        #: Entries whose client has since been rescheduled or cancelled (an estimate:
        #: it may count an entry twice, which only makes a rebuild come earlier).
        self._stale = 0

    def schedule(self, client: TimerClient, deadline: float) -> None:
        """Wake ``client`` at ``deadline`` (replacing any earlier schedule)."""
        if client.timer_deadline == deadline:
            return
        if client.timer_deadline is not None:
            self._went_stale()
        client.timer_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._counter), client))

    def cancel(self, client: TimerClient) -> None:
        if client.timer_deadline is not None:
            client.timer_deadline = None
            self._went_stale()

    def _went_stale(self) -> None:
        self._stale += 1
        if self._stale > _COMPACT_MIN and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2].timer_deadline == e[0]]
            heapq.heapify(self._heap)
            self._stale = 0

    def _pop_stale(self) -> None:
        heapq.heappop(self._heap)
        if self._stale:
            self._stale -= 1

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].timer_deadline != heap[0][0]:
            self._pop_stale()
        return heap[0][0] if heap else None

    def run(self, now: float) -> None:
        """Call ``on_timer`` of every client whose deadline is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, client = heap[0]
            if client.timer_deadline == deadline:
                heapq.heappop(heap)
                client.timer_deadline = None
                client.on_timer(now)
            else:
                self._pop_stale()
            heap = self._heap  # on_timer may have rebuilt it

    def __len__(self) -> int:
        return len(self._heap)
