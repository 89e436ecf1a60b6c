"""Hypothesis strategies for the bounded fuzz runs: seeds from real captures, mutated.

A wire input is a captured seed with a few byte edits (set, insert, delete, cut, an
"interesting" 16-bit value such as 0, 0xFFFF or 0x8000 written over a length field),
or plain random bytes. A stack program is a captured program (a replayed flow) with
operation-level edits: a frame mutated, an operation inserted (a random one, with
random host events among them), deleted or repeated.

Every run is derandomized (:data:`BOUNDED`), so the regular suite checks the same
inputs each time; the long, coverage-guided search is ``scripts/fuzz``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from pyslirp.wire import vnet
from tests.fuzz import stackprog
from tests.fuzz.seeds import all_frames

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_EDIT_KINDS = ("set", "insert", "delete", "cut", "word")


def bounded(max_examples: int) -> settings:
    """Settings of a bounded run: fixed inputs, no database, no wall-clock deadline."""
    return settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)


def apply_edits(seed: bytes, edits: Sequence[tuple[str, int, int]]) -> bytes:
    out = bytearray(seed)
    for kind, pos, value in edits:
        pos %= len(out) + 1
        if kind == "set" and pos < len(out):
            out[pos] = value & 0xFF
        elif kind == "insert":
            out[pos:pos] = bytes((value & 0xFF,)) * (1 + value % 4)
        elif kind == "delete":
            del out[pos:pos + 1 + value % 8]
        elif kind == "cut":
            del out[pos:]
        elif kind == "word":
            out[pos:pos + 2] = _INTERESTING[value % len(_INTERESTING)].to_bytes(2, "big")
    return bytes(out)


_edits = st.lists(st.tuples(st.sampled_from(_EDIT_KINDS), st.integers(0, 1 << 16),
                            st.integers(0, 255)), min_size=1, max_size=6)


def mutated(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(apply_edits, st.sampled_from(list(seeds)), _edits)


def wire_input(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(seeds), st.sampled_from(list(seeds)), st.binary(max_size=300))


# ---- stack programs ------------------------------------------------------------------------

def _guest_frames() -> list[bytes]:
    return [vnet.build(vnet.F_DATA_VALID) + c.frame for c in all_frames() if c.from_guest]


def _arg(kind: str, name: str) -> st.SearchStrategy[Any]:
    if kind == "B":
        return st.integers(0, 255)
    if kind == "H":
        if name == "advance":
            return st.sampled_from((1, 20, 100, 150, 1000, 6000, 30000, 65535))
        return st.integers(0, 0xFFFF)
    if name == "frame":
        return mutated(_guest_frames())
    return st.binary(max_size=200)


def _op(name: str) -> st.SearchStrategy[stackprog.Op]:
    return st.tuples(st.just(name), *(_arg(kind, name) for kind in stackprog.OPS[name]))


random_op = st.sampled_from(stackprog.OPCODES).flatmap(_op)
_frame_flags = st.sampled_from((stackprog.FRAME_FIX_CHECKSUMS | stackprog.FRAME_FLUSH,
                                stackprog.FRAME_FIX_CHECKSUMS, stackprog.FRAME_FLUSH, 0))


def _edit_program(ops: list[stackprog.Op], edits: list[tuple[str, int, Any]]) -> list[stackprog.Op]:
    ops = list(ops)
    for kind, pos, value in edits:
        pos %= len(ops) + 1
        if kind == "insert":
            ops.insert(pos, value)
        elif pos == len(ops):
            continue
        elif kind == "delete":
            del ops[pos]
        elif kind == "repeat":
            ops.insert(pos, ops[pos])
        elif kind == "mutate" and ops[pos][0] == "frame":
            flags, byte_edits = value
            frame = ops[pos][2]
            head, body = frame[:vnet.HEADER_LEN], frame[vnet.HEADER_LEN:]
            ops[pos] = ("frame", flags, head + apply_edits(body, byte_edits))
    return ops


_program_edit = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 1000), random_op),
    st.tuples(st.sampled_from(("delete", "repeat")), st.integers(0, 1000), st.none()),
    st.tuples(st.just("mutate"), st.integers(0, 1000), st.tuples(_frame_flags, _edits)))


def stack_program() -> st.SearchStrategy[tuple[int, list[stackprog.Op]]]:
    """(config byte, operations): a captured program with edits, or random operations."""
    seeds = [stackprog.decode(p) for p in stackprog.stack_seeds()]
    edited = st.builds(lambda seed, edits: (seed[0], _edit_program(seed[1], edits)),
                       st.sampled_from(seeds), st.lists(_program_edit, min_size=1, max_size=12))
    config = st.sampled_from((0, stackprog.CFG_NO_OFFLOAD, stackprog.CFG_SMALL_MTU,
                              stackprog.CFG_NO_HOST_LOOPBACK))
    fresh = st.tuples(config, st.lists(random_op, max_size=30))
    return st.one_of(edited, fresh)
