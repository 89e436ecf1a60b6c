"""The out-of-order store: what it holds, delivery order, SACK blocks."""

from __future__ import annotations

import pytest

from pyslirp.stack.reassembly import OutOfOrderStore
from pyslirp.stack.seq import SEQ_MASK


def test_it_counts_what_it_holds_and_is_full_at_its_cap() -> None:
    store = OutOfOrderStore(max_segments=2)
    store.add(100, b"abc", False)
    assert len(store) == 1 and store.nbytes == 3 and not store.is_full()
    store.add(200, b"de", True)
    assert store.is_full() and store.nbytes == 5
    assert store.held_len(200) == 2 and store.held_len(300) is None


def test_a_longer_copy_replaces_the_shorter_one() -> None:
    store = OutOfOrderStore(8)
    store.add(100, b"ab", False)
    assert store.replace(100, b"abcd", True) == 2
    assert store.nbytes == 4 and store.pop(100) == (b"abcd", True)
    assert store.nbytes == 0 and len(store) == 0


def test_adding_twice_at_one_sequence_number_is_refused() -> None:
    store = OutOfOrderStore(8)
    store.add(100, b"ab", False)
    with pytest.raises(ValueError, match="already held"):
        store.add(100, b"cd", False)


def test_delivery_order_counts_from_rcv_nxt_across_the_wrap() -> None:
    store = OutOfOrderStore(8)
    for seq in (5, SEQ_MASK - 1, 50, SEQ_MASK - 100):
        store.add(seq, b"x", False)
    # SEQ_MASK - 100 lies behind rcv_nxt: it sorts last.
    assert store.order_from(SEQ_MASK - 1) == [SEQ_MASK - 1, 5, 50, SEQ_MASK - 100]


def test_sack_blocks_merge_overlaps_and_lead_with_the_newest() -> None:
    store = OutOfOrderStore(8)
    store.add(1100, b"x" * 100, False)   # [1100, 1200)
    store.add(1150, b"x" * 100, False)   # overlaps: [1100, 1250)
    store.add(1500, b"x" * 10, False)    # newest: [1500, 1510)
    assert store.sack_blocks(1000) == [(1500, 1510), (1100, 1250)]


def test_sack_blocks_wrap_like_sequence_numbers() -> None:
    store = OutOfOrderStore(8)
    store.add(SEQ_MASK - 4, b"x" * 10, False)
    assert store.sack_blocks(SEQ_MASK - 9) == [(SEQ_MASK - 4, 5)]


def test_clear_forgets_everything() -> None:
    store = OutOfOrderStore(8)
    store.add(1, b"abc", True)
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.sack_blocks(0) == []


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_segments"):
        OutOfOrderStore(-1)
