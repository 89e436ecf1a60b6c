"""The send queue: chunks kept by reference, frames sliced from them, release on ACK."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyslirp.stack.sendqueue import COALESCE_BELOW, SendQueue


def joined(parts: list[object]) -> bytes:
    return b"".join(bytes(p) for p in parts)  # type: ignore[call-overload]


def test_a_big_read_is_kept_by_reference_and_sliced_without_copies() -> None:
    queue = SendQueue()
    data = bytes(range(256)) * 256
    queue.append(data)
    assert queue.unacked == len(data)
    whole = queue.slices(0, len(data))
    assert whole == [data] and whole[0] is data
    part = queue.slices(100, 50)
    assert isinstance(part[0], memoryview) and part[0].obj is data
    assert bytes(part[0]) == data[100:150]


def test_small_reads_are_coalesced_into_one_chunk() -> None:
    queue = SendQueue()
    for _ in range(3):
        queue.append(b"x" * 100)
    assert len(queue.chunks) == 1 and queue.end_pos == 300
    queue.append(b"y" * COALESCE_BELOW)
    assert len(queue.chunks) == 2


def test_a_slice_may_span_chunks() -> None:
    queue = SendQueue()
    queue.append(b"a" * COALESCE_BELOW)
    queue.append(b"b" * COALESCE_BELOW)
    assert joined(queue.slices(COALESCE_BELOW - 2, 4)) == b"aabb"


def test_release_drops_only_wholly_acknowledged_chunks() -> None:
    queue = SendQueue()
    queue.append(b"a" * COALESCE_BELOW)
    queue.append(b"b" * COALESCE_BELOW)
    queue.release(COALESCE_BELOW - 1)
    assert len(queue.chunks) == 2 and queue.unacked == COALESCE_BELOW + 1
    queue.release(1)
    assert len(queue.chunks) == 1 and queue.head_pos == COALESCE_BELOW
    assert joined(queue.slices(queue.acked_pos, 3)) == b"bbb"


def test_clear_counts_everything_as_released() -> None:
    queue = SendQueue()
    queue.append(b"abc")
    queue.clear()
    assert queue.unacked == 0 and not queue.chunks


@given(st.lists(st.integers(1, 3 * COALESCE_BELOW), min_size=1, max_size=8),
       st.data())
def test_slices_always_match_the_stream(sizes: list[int], data: st.DataObject) -> None:
    queue = SendQueue()
    stream = b""
    for k, size in enumerate(sizes):
        chunk = bytes([k]) * size
        queue.append(chunk)
        stream += chunk
    for _ in range(5):
        if queue.acked_pos < len(stream):
            queue.release(data.draw(st.integers(0, len(stream) - queue.acked_pos)))
        if queue.acked_pos == len(stream):
            break
        pos = data.draw(st.integers(queue.acked_pos, len(stream) - 1))
        n = data.draw(st.integers(1, len(stream) - pos))
        assert joined(queue.slices(pos, n)) == stream[pos:pos + n]


def test_a_drained_queue_takes_new_data_where_the_stream_left_off() -> None:
    queue = SendQueue()
    queue.append(b"a" * 10)
    queue.slices(0, 10)
    queue.release(10)
    assert queue.unacked == 0 and not queue.chunks
    queue.append(b"bcd")
    assert queue.head_pos == 10 and queue.end_pos == 13
    assert joined(queue.slices(10, 3)) == b"bcd"


@given(st.lists(st.lists(st.integers(1, 2 * COALESCE_BELOW), min_size=1, max_size=4),
                min_size=1, max_size=5), st.data())
def test_slices_match_the_stream_across_drains(rounds: list[list[int]],
                                               data: st.DataObject) -> None:
    """Reads arrive, are sent and acknowledged (sometimes all of them), and more
    arrive: the stream stays continuous however often the queue runs empty."""
    queue = SendQueue()
    stream = b""
    for r, sizes in enumerate(rounds):
        for k, size in enumerate(sizes):
            chunk = bytes([r * 8 + k]) * size
            queue.append(chunk)
            stream += chunk
        pos = data.draw(st.integers(queue.acked_pos, len(stream) - 1))
        n = data.draw(st.integers(1, len(stream) - pos))
        assert joined(queue.slices(pos, n)) == stream[pos:pos + n]
        everything = len(stream) - queue.acked_pos
        queue.release(data.draw(st.sampled_from([everything, everything // 2])))
    assert queue.end_pos == len(stream)
