"""What both flood filters' sans-I/O tests check of a run with the filter against one
without (tests/stack/test_udp_flood_filter.py, tests/stack/test_tcp_syn_flood_filter.py)."""

from __future__ import annotations

from typing import Any


def assert_filtered_as_admitted(plain: dict[str, Any], filtered: dict[str, Any],
                                engaged: str, unread: str) -> None:
    """The filter engaged once within a few reviews, the stack read a small share of the
    flood yet admitted as much as without the filter, the filter came off within a few
    reviews of the flood's end, and the ``unread`` estimate is within 10 % of the truth."""
    counters = filtered["counters"]
    assert counters[engaged] == 1, counters
    assert filtered["engaged_at"] is not None and filtered["engaged_at"] <= 0.35
    # While the filter is on the stack reads about FLOOD_SAMPLE x the admission rate.
    assert filtered["flood_read_filtered"] < 0.25 * filtered["flood_dropped"], filtered
    # Every token is still spent: the flood gets what admission gives it.
    assert 0.9 * plain["admitted"] <= filtered["admitted"] <= plain["admitted"] + 2, (
        filtered, plain)
    assert filtered["filter"] is None
    assert filtered["released_at"] is not None and filtered["released_at"] <= 0.35
    estimate, truth = counters[unread], filtered["flood_dropped"]
    assert abs(estimate - truth) <= 0.1 * truth, (estimate, truth)
    assert engaged not in plain["counters"] and unread not in plain["counters"]
