"""A fault-injecting link layer for tests: drop, duplicate and reorder frames.

TEST-ONLY. Enabled by the environment variable ``PYSLIRP_FAULTS``, e.g.
``PYSLIRP_FAULTS="drop=0.02,dup=0.01,reorder=0.02,seed=1"``; never set it in
production. The kernel here has no ``netem`` qdisc, so this is how the e2e
tests get duplication and reordering (random loss also comes from nftables).

Theory of operation
-------------------
In the spirit of smoltcp's ``FaultInjector``: a pure object (no fds, no
clock reads) that the runtime places on the frame path, one instance per
direction (guest -> stack and stack -> guest: :class:`LinkFaults`, built by
:func:`from_env`). For
each frame :meth:`FaultInjector.process` draws one number from its seeded
RNG and decides:

* ``r < drop``: the frame disappears;
* ``r < drop + dup``: it is delivered twice, back to back;
* ``r < drop + dup + reorder``: it is held back; it is delivered right after
  the next frame that gets through, or by :meth:`flush` when the runtime's
  timer (``hold_seconds`` after :meth:`process` returned with
  :attr:`holding` set) fires first, so a quiet link never strands it;
* otherwise it passes unchanged.

With one draw per frame the outcome depends only on the seed and the frame
sequence, so a failing run can be replayed exactly. At most one frame is
held at a time: a reorder decision while one is held delivers the new frame
and then the held one (the pair swaps places), which keeps the displacement
at one frame and the memory bounded.

A frame that is held or duplicated is copied to ``bytes`` first, because
the runtime reads frames into buffers it reuses; frames that pass untouched
are handed back as given (no copy).

Not done on purpose: corruption, delay of every frame, rate limiting, size
limits (smoltcp has them; the tests here don't need them yet).
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyslirp.wire.buffer import Buffer

Frame = Buffer | Sequence[Buffer]

ENV_VAR = "PYSLIRP_FAULTS"
DEFAULT_HOLD_SECONDS = 0.005


def _own(frame: Frame) -> Frame:
    """A copy of ``frame`` that stays valid after the caller reuses its buffers."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, bytearray | memoryview):
        return bytes(frame)
    return tuple(p if isinstance(p, bytes) else bytes(p) for p in frame)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Rates (probabilities per frame), the seed, and how long a held frame may wait."""

    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    seed: int = 0
    hold_seconds: float = DEFAULT_HOLD_SECONDS

    def __post_init__(self) -> None:
        for name in ("drop", "dup", "reorder"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{ENV_VAR}: {name}={rate} is not a probability in [0, 1]")
        if self.drop + self.dup + self.reorder > 1.0:
            raise ValueError(f"{ENV_VAR}: drop + dup + reorder must not exceed 1")
        if self.hold_seconds <= 0:
            raise ValueError(f"{ENV_VAR}: hold={self.hold_seconds} must be positive")

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``"drop=0.02,dup=0.01,reorder=0.02,seed=1,hold=0.005"`` (any subset)."""
        values: dict[str, float | int] = {}
        for item in text.replace(" ", "").split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            try:
                if not sep:
                    raise ValueError
                if key == "seed":
                    values["seed"] = int(value)
                elif key in ("drop", "dup", "reorder"):
                    values[key] = float(value)
                elif key == "hold":
                    values["hold_seconds"] = float(value)
                else:
                    raise KeyError(key)
            except KeyError:
                raise ValueError(f"{ENV_VAR}: unknown key {key!r} (drop, dup, reorder, seed, "
                                 "hold)") from None
            except ValueError:
                raise ValueError(f"{ENV_VAR}: cannot read {item!r}") from None
        return cls(**values)  # type: ignore[arg-type]


class FaultInjector:
    """Drops, duplicates and reorders the frames of one direction of the link."""

    __slots__ = ("drop_rate", "dup_rate", "reorder_rate", "hold_seconds", "_rng", "_held",
                 "dropped", "duplicated", "reordered", "passed")

    def __init__(self, drop_rate: float = 0.0, dup_rate: float = 0.0, reorder_rate: float = 0.0,
                 seed: int | str = 0, hold_seconds: float = DEFAULT_HOLD_SECONDS) -> None:
        FaultSpec(drop_rate, dup_rate, reorder_rate, 0, hold_seconds)  # validates
        self.drop_rate = drop_rate
        self.dup_rate = dup_rate
        self.reorder_rate = reorder_rate
        self.hold_seconds = hold_seconds
        self._rng = random.Random(seed)
        self._held: Frame | None = None
        self.dropped = 0
        self.duplicated = 0
        self.reordered = 0
        self.passed = 0

    @property
    def holding(self) -> bool:
        """A frame is held; the runtime should call :meth:`flush` after ``hold_seconds``."""
        return self._held is not None

    def process(self, frame: Frame) -> list[Frame]:
        """The frames to deliver now, in order, in exchange for ``frame``."""
        r = self._rng.random()
        if r < self.drop_rate:
            self.dropped += 1
            return []
        r -= self.drop_rate
        if r < self.dup_rate:
            self.duplicated += 1
            copy = _own(frame)
            out: list[Frame] = [copy, copy]
        elif r - self.dup_rate < self.reorder_rate:
            self.reordered += 1
            if self._held is None:
                self._held = _own(frame)
                return []
            out = [frame]  # a second reorder: swap it with the held one
        else:
            self.passed += 1
            out = [frame]
        if self._held is not None:
            out.append(self._held)
            self._held = None
        return out

    def flush(self) -> list[Frame]:
        """Release the held frame (if any): the hold time is over, or the link is closing."""
        held, self._held = self._held, None
        return [] if held is None else [held]


class LinkFaults:
    """The two injectors of one guest link, one per direction, from one :class:`FaultSpec`.

    Directions are named from the guest's point of view: ``"from_guest"``
    (TAP -> stack) and ``"to_guest"`` (stack -> TAP). Each has its own RNG
    stream derived from the seed, so the two directions are independent but
    a run is still replayed exactly by the same seed.
    """

    __slots__ = ("spec", "from_guest", "to_guest")

    DIRECTIONS = ("from_guest", "to_guest")

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec
        self.from_guest = FaultInjector(spec.drop, spec.dup, spec.reorder,
                                        f"{spec.seed}/from_guest", spec.hold_seconds)
        self.to_guest = FaultInjector(spec.drop, spec.dup, spec.reorder,
                                      f"{spec.seed}/to_guest", spec.hold_seconds)

    @classmethod
    def from_spec(cls, text: str) -> LinkFaults:
        return cls(FaultSpec.parse(text))

    def injector(self, direction: str) -> FaultInjector:
        if direction == "from_guest":
            return self.from_guest
        if direction == "to_guest":
            return self.to_guest
        raise ValueError(f"unknown direction {direction!r} (from_guest, to_guest)")

    def process(self, frame: Frame, direction: str) -> list[Frame]:
        return self.injector(direction).process(frame)

    def flush(self, direction: str) -> list[Frame]:
        return self.injector(direction).flush()

    @property
    def hold_seconds(self) -> float:
        return self.spec.hold_seconds


def from_env(environ: Mapping[str, str] | None = None) -> LinkFaults | None:
    """The link's injectors from ``PYSLIRP_FAULTS``, or None when it is unset or empty.

    Raises ``ValueError`` with a message naming the variable when it is malformed.
    """
    text = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not text:
        return None
    return LinkFaults.from_spec(text)
