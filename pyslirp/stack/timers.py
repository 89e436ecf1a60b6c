"""One deadline heap shared by every engine of a stack.

Theory of operation
-------------------
An engine object that wants to be woken has an ``on_timer(now)`` method and
calls :meth:`Timers.schedule` with a deadline. Rescheduling pushes a new entry;
stale entries are skipped when popped (the object's ``timer_deadline`` no longer
matches), so rescheduling costs O(log n) and cancelling is O(1). The runtime
asks :meth:`next_deadline` after each batch of work and arms one loop timer.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol


class TimerClient(Protocol):
    timer_deadline: float | None

    def on_timer(self, now: float) -> None: ...


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerClient]] = []
        self._counter = itertools.count()

    def schedule(self, client: TimerClient, deadline: float) -> None:
        """Wake ``client`` at ``deadline`` (replacing any earlier schedule)."""
        if client.timer_deadline == deadline:
            return
        client.timer_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._counter), client))

    @staticmethod
    def cancel(client: TimerClient) -> None:
        client.timer_deadline = None

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].timer_deadline != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run(self, now: float) -> None:
        """Call ``on_timer`` of every client whose deadline is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, client = heapq.heappop(heap)
            if client.timer_deadline == deadline:
                client.timer_deadline = None
                client.on_timer(now)

    def __len__(self) -> int:
        return len(self._heap)
