"""RFC 6298 estimator: first sample, smoothing, clamping, Karn, back-off."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyslirp.stack.rtt import RttEstimator


def estimator() -> RttEstimator:
    return RttEstimator(1.0, 0.2, 60.0)


def test_the_initial_timeout_holds_until_the_first_sample() -> None:
    rtt = estimator()
    assert rtt.rto == 1.0 and rtt.srtt is None


def test_the_first_sample_sets_srtt_and_half_of_it_as_variation() -> None:
    rtt = estimator()
    rtt.sample(0.4)
    assert rtt.srtt == 0.4 and rtt.rttvar == 0.2
    assert rtt.rto == pytest.approx(0.4 + 4 * 0.2)


def test_later_samples_are_smoothed() -> None:
    rtt = estimator()
    rtt.sample(0.4)
    rtt.sample(0.8)
    assert rtt.rttvar == pytest.approx(0.75 * 0.2 + 0.25 * 0.4)
    assert rtt.srtt == pytest.approx(0.875 * 0.4 + 0.125 * 0.8)


def test_a_fast_link_still_waits_the_minimum() -> None:
    rtt = estimator()
    for _ in range(20):
        rtt.sample(0.0001)
    assert rtt.rto == 0.2


def test_back_off_doubles_up_to_the_maximum() -> None:
    rtt = estimator()
    rtt.back_off()
    assert rtt.rto == 2.0
    for _ in range(10):
        rtt.back_off()
    assert rtt.rto == 60.0


def test_the_timed_segment_gives_one_sample_and_karn_discards_it() -> None:
    rtt = estimator()
    rtt.time_segment(1000, now=5.0)
    assert rtt.timed_seq == 1000
    rtt.sample_timed(now=5.3)
    assert rtt.srtt == pytest.approx(0.3) and rtt.timed_seq is None
    rtt.time_segment(2000, now=6.0)
    rtt.discard_timed()
    assert rtt.timed_seq is None and rtt.srtt == pytest.approx(0.3)


def test_bounds_in_the_wrong_order_are_refused() -> None:
    with pytest.raises(ValueError, match="rto_min <= rto_max"):
        RttEstimator(1.0, 2.0, 1.0)


@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=50))
def test_the_timeout_always_stays_within_its_bounds(samples: list[float]) -> None:
    rtt = estimator()
    for r in samples:
        rtt.sample(r)
        assert 0.2 <= rtt.rto <= 60.0
