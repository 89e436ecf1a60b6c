"""FaultInjector: deterministic drop, duplication and reordering of frames."""

from __future__ import annotations

from collections import Counter

import pytest

from pyslirp.runtime.faults import ENV_VAR, FaultInjector, FaultSpec, LinkFaults, from_env


def _run(inj: FaultInjector, n: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(n):
        out += [bytes(f) for f in inj.process(i.to_bytes(4, "big"))]  # type: ignore[arg-type]
    out += [bytes(f) for f in inj.flush()]  # type: ignore[arg-type]
    return out


def _ids(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(f, "big") for f in frames]


def test_no_faults_passes_everything_in_order_without_copying() -> None:
    inj = FaultInjector(seed=1)
    frame = memoryview(bytearray(b"abc"))
    assert inj.process(frame)[0] is frame
    assert _ids(_run(inj, 100)) == list(range(100))
    assert not inj.holding


def test_same_seed_same_outcome_different_seed_differs() -> None:
    a = _run(FaultInjector(0.1, 0.1, 0.1, seed=7), 500)
    b = _run(FaultInjector(0.1, 0.1, 0.1, seed=7), 500)
    c = _run(FaultInjector(0.1, 0.1, 0.1, seed=8), 500)
    assert a == b
    assert a != c


def test_rates_are_roughly_honoured_and_counted() -> None:
    inj = FaultInjector(0.1, 0.05, 0.05, seed=3)
    ids = _ids(_run(inj, 10000))
    counts = Counter(ids)
    dropped = 10000 - len(counts)
    duplicated = sum(1 for c in counts.values() if c == 2)
    assert (dropped, duplicated) == (inj.dropped, inj.duplicated)
    assert 800 < dropped < 1200
    assert 350 < duplicated < 650
    assert 350 < inj.reordered < 650
    assert inj.dropped + inj.duplicated + inj.reordered + inj.passed == 10000
    # Every frame not dropped arrives; nothing is invented.
    assert set(ids) <= set(range(10000))
    assert max(counts.values()) == 2


def test_drop_all_and_duplicate_all() -> None:
    assert _run(FaultInjector(drop_rate=1.0), 10) == []
    assert _ids(_run(FaultInjector(dup_rate=1.0), 3)) == [0, 0, 1, 1, 2, 2]


def test_reordered_frame_comes_after_the_next_one() -> None:
    inj = FaultInjector(reorder_rate=1.0)
    assert inj.process(b"A") == []
    assert inj.holding
    # The next frame is also chosen for reordering: the two swap places.
    assert inj.process(b"B") == [b"B", b"A"]
    assert not inj.holding
    assert inj.process(b"C") == []
    assert inj.flush() == [b"C"]
    assert inj.flush() == []


def test_held_frame_is_released_after_a_passing_frame() -> None:
    inj = FaultInjector(reorder_rate=0.5, seed=0)
    ids = _ids(_run(inj, 2000))
    assert sorted(ids) == list(range(2000))  # nothing lost or doubled
    displaced = [i for i, frame_id in enumerate(ids) if frame_id != i]
    assert displaced, "some frames must come out of order"
    assert all(abs(ids[i] - i) == 1 for i in displaced)


def test_held_frame_is_copied_because_buffers_are_reused() -> None:
    inj = FaultInjector(reorder_rate=1.0)
    buf = bytearray(b"first")
    inj.process(memoryview(buf))
    buf[:] = b"later"
    assert inj.flush() == [b"first"]
    inj2 = FaultInjector(dup_rate=1.0)
    out = inj2.process([bytearray(b"ab"), memoryview(b"cd")])
    assert out == [(b"ab", b"cd"), (b"ab", b"cd")]


def test_env_parsing() -> None:
    assert from_env({}) is None
    assert from_env({ENV_VAR: " "}) is None
    faults = from_env({ENV_VAR: "drop=0.02, dup=0.01,reorder=0.02,seed=1,hold=0.01"})
    assert faults is not None
    to_stack = faults.injector("from_guest")
    assert (to_stack.drop_rate, to_stack.dup_rate, to_stack.reorder_rate) == (0.02, 0.01, 0.02)
    assert faults.hold_seconds == faults.to_guest.hold_seconds == 0.01
    with pytest.raises(ValueError, match="direction"):
        faults.injector("sideways")


def test_directions_are_independent_but_replayable() -> None:
    text = "drop=0.1,dup=0.1,reorder=0.1,seed=5"
    a, b = LinkFaults.from_spec(text), LinkFaults.from_spec(text)
    assert _run(a.from_guest, 300) != _run(a.to_guest, 300)
    assert _run(b.from_guest, 300) == _run(LinkFaults.from_spec(text).from_guest, 300)
    c = LinkFaults.from_spec("reorder=1")
    assert c.process(b"x", "to_guest") == []
    assert (c.to_guest.holding, c.from_guest.holding) == (True, False)
    assert c.flush("from_guest") == []
    assert c.flush("to_guest") == [b"x"]


@pytest.mark.parametrize("text, message", [
    ("drop=2", "not a probability"),
    ("drop=0.5,dup=0.4,reorder=0.2", "must not exceed 1"),
    ("loss=0.1", "unknown key 'loss'"),
    ("drop", "cannot read 'drop'"),
    ("seed=x", "cannot read 'seed=x'"),
    ("hold=0", "must be positive"),
])
def test_bad_env_values_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_env({ENV_VAR: text})
    with pytest.raises(ValueError):
        FaultSpec.parse(text)
