"""Sequence-number arithmetic across the 2**32 wrap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyslirp.stack.seq import SEQ_HALF, SEQ_MASK, seq_add, seq_diff, seq_le, seq_lt, seq_window

seqs = st.integers(0, SEQ_MASK)
distances = st.integers(0, SEQ_HALF - 1)


def test_add_wraps_past_the_top() -> None:
    assert seq_add(SEQ_MASK, 1) == 0
    assert seq_add(SEQ_MASK - 9, 20) == 10
    assert seq_add(5, -10) == SEQ_MASK - 4


def test_diff_counts_forward_across_the_wrap() -> None:
    assert seq_diff(10, SEQ_MASK - 9) == 20
    assert seq_diff(3, 3) == 0
    assert seq_diff(2, 3) == SEQ_MASK


def test_order_across_the_wrap() -> None:
    assert seq_lt(SEQ_MASK, 0) and not seq_lt(0, SEQ_MASK)
    assert seq_le(7, 7) and not seq_lt(7, 7)


@given(seqs, distances)
def test_a_number_is_before_what_lies_ahead_of_it(a: int, n: int) -> None:
    b = seq_add(a, n)
    assert seq_le(a, b)
    assert seq_lt(a, b) == (n > 0)
    assert seq_diff(b, a) == n
    assert seq_window(b, a) == n


@given(seqs, st.integers(1, SEQ_HALF))
def test_a_window_whose_right_edge_fell_behind_is_empty(a: int, n: int) -> None:
    assert seq_window(seq_add(a, -n), a) == 0
