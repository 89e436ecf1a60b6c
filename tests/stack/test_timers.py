"""The shared deadline heap: due clients run once, and dead clients are let go."""

from __future__ import annotations

import gc
import random
import weakref

from pyslirp.stack.timers import Timers


class Client:
    def __init__(self) -> None:
        self.timer_deadline: float | None = None
        self.fired: list[float] = []

    def on_timer(self, now: float) -> None:
        self.fired.append(now)


def test_due_clients_run_once_at_their_latest_deadline() -> None:
    rng = random.Random(5)
    timers = Timers()
    clients = [Client() for _ in range(2000)]
    final: dict[int, float | None] = {}
    for _ in range(20_000):  # enough reschedules and cancels to rebuild the heap often
        i = rng.randrange(len(clients))
        if rng.random() < 0.2:
            timers.cancel(clients[i])
            final[i] = None
        else:
            deadline = float(rng.randrange(1, 1000))
            timers.schedule(clients[i], deadline)
            final[i] = deadline
    expected = {i: d for i, d in final.items() if d is not None}
    assert timers.next_deadline() == min(expected.values())
    timers.run(1000.0)
    for i, client in enumerate(clients):
        assert client.fired == ([1000.0] if i in expected else [])
    assert timers.next_deadline() is None


def test_clients_cancelled_far_ahead_of_their_deadline_are_released() -> None:
    # A closed connection's keepalive is 10 minutes out; under connection churn the
    # heap must not keep every closed flow alive until then.
    timers = Timers()
    refs = []
    for _ in range(10_000):
        client = Client()
        timers.schedule(client, 600.0)
        timers.cancel(client)
        refs.append(weakref.ref(client))
    del client
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive < 1000
    assert len(timers) < 1000


def test_a_client_rescheduled_inside_its_own_wakeup_runs_again() -> None:
    timers = Timers()

    class Again(Client):
        def on_timer(self, now: float) -> None:
            super().on_timer(now)
            if len(self.fired) < 3:
                timers.schedule(self, now + 1)

    again = Again()
    timers.schedule(again, 1.0)
    for now in (1.0, 2.0, 3.0, 4.0):
        timers.run(now)
    assert again.fired == [1.0, 2.0, 3.0]
