"""Deterministic guard on memory: heap bytes an idle TCP connection keeps.

bench/run.py's idle row measures RSS for 1,000 idle connections on a live stack;
here tracemalloc counts what the stack's own objects take per idle flow (the
flow, its parts, its table and timer entries), which is exact and the same on
every run of one Python version. The budget sits in tests/memory_budget.json
with its measured value; a change that makes idle flows heavier fails here.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import pytest

from tests.hotpath import Rig

BUDGET = json.loads((Path(__file__).parent / "memory_budget.json").read_text())

#: Idle flows measured at once: enough that the flow table's resizes average out.
FLOWS = 500


def _heap_per_idle_flow(rig: Rig, first_port: int) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        flows = [rig.idle_connection(first_port + i) for i in range(FLOWS)]
        rig.host.calls.clear()   # the fake host's call log is not the stack's
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert all(f.state == "ESTABLISHED" and f.send_queue_len == 0 for f in flows)
    return (after - before) / FLOWS


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_idle_connection_heap_stays_within_budget(ipv6: bool) -> None:
    rig = Rig(ipv6=ipv6)
    for port in range(30000, 30010):   # first connections fill one-off caches
        rig.idle_connection(port)
    per_flow = _heap_per_idle_flow(rig, 31000)
    budget = BUDGET["idle_tcp_flow_bytes"]
    assert per_flow <= budget, f"{per_flow:.0f} heap bytes per idle TCP flow, budget {budget}"
