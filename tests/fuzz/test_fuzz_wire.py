"""Bounded fuzzing of every wire parser, from the captured seeds (see tests/fuzz/targets.py).

Each parser gets its seeds, mutations of them and random bytes, the same ones every
run (derandomized); it must accept or raise MalformedPacket, and never anything else.
The long, coverage-guided run of the same targets is ``scripts/fuzz TARGET``.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.fuzz.seeds import wire_seeds
from tests.fuzz.strategies import bounded, wire_input
from tests.fuzz.targets import WIRE_TARGETS, run_target

EXAMPLES = 400


@pytest.mark.parametrize("name", sorted(WIRE_TARGETS))
def test_every_seed_parses(name: str) -> None:
    """The seeds are real frames: each parser accepts its own layer of them."""
    for seed in wire_seeds(name):
        WIRE_TARGETS[name](seed)


@pytest.mark.parametrize("name", sorted(WIRE_TARGETS))
def test_mutated_input_is_accepted_or_rejected_cleanly(name: str) -> None:
    target = WIRE_TARGETS[name]

    @bounded(EXAMPLES)
    @given(wire_input(wire_seeds(name)))
    def check(data: bytes) -> None:
        run_target(target, data)

    check()
