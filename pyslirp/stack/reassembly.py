"""Out-of-order segments held until the gap before them is filled.

Theory of operation
-------------------
A TCP receiver may keep segments that arrive past ``rcv_nxt`` and deliver
them once the missing bytes arrive (RFC 9293 3.10.7.4). An
:class:`OutOfOrderStore` holds them keyed by their first sequence number,
each with its FIN bit, and counts their payload (``nbytes``) so the flow can
charge it to its window and to the engine's memory budget; the flow decides
*whether* a segment may be stored (segment cap, budget), the store only keeps
them. Overlaps are kept as they came: a segment resent longer at the same
sequence number replaces the shorter copy, and delivery skips what is
already in order.

It also answers the two questions the flow asks about held data: which
segments are due, in delivery order (:meth:`OutOfOrderStore.order_from`),
and which ranges to report as SACK blocks (:meth:`OutOfOrderStore.sack_blocks`,
RFC 2018: merged ranges, the one holding the newest segment first).

The flow's per-frame path tests ``segments`` (a dict: truth and ``len()``
are C calls) rather than the store itself, whose ``__len__`` would be a
Python call per frame.
"""

from __future__ import annotations

from pyslirp.stack.seq import seq_add, seq_diff


class OutOfOrderStore:
    """Segments received past ``rcv_nxt``: seq -> (payload, FIN)."""

    __slots__ = ("segments", "nbytes", "newest", "max_segments")

    def __init__(self, max_segments: int) -> None:
        if max_segments < 0:
            raise ValueError(f"max_segments must be >= 0, got {max_segments}")
        self.segments: dict[int, tuple[bytes, bool]] = {}
        #: Payload bytes held (without per-segment overhead).
        self.nbytes = 0
        #: Sequence number of the most recently added segment (for SACK order).
        self.newest = 0
        self.max_segments = max_segments

    def __len__(self) -> int:
        return len(self.segments)

    def held_len(self, seq: int) -> int | None:
        """Length of the segment held at ``seq``, or None if there is none."""
        held = self.segments.get(seq)
        return None if held is None else len(held[0])

    def is_full(self) -> bool:
        """No room for another segment (``max_segments`` reached)."""
        return len(self.segments) >= self.max_segments

    def add(self, seq: int, data: bytes, fin: bool) -> None:
        """Hold a new segment at ``seq`` (the caller checked ``is_full``)."""
        if seq in self.segments:
            raise ValueError(f"a segment at {seq} is already held: use replace()")
        self.segments[seq] = (data, fin)
        self.nbytes += len(data)
        self.newest = seq

    def replace(self, seq: int, data: bytes, fin: bool) -> int:
        """Put a longer copy in place of the segment at ``seq``; returns the growth."""
        old, _ = self.segments[seq]
        self.segments[seq] = (data, fin)
        growth = len(data) - len(old)
        self.nbytes += growth
        return growth

    def pop(self, seq: int) -> tuple[bytes, bool]:
        """Remove and return the segment at ``seq`` (payload, FIN)."""
        data, fin = self.segments.pop(seq)
        self.nbytes -= len(data)
        return data, fin

    def clear(self) -> None:
        self.segments.clear()
        self.nbytes = 0

    def order_from(self, rcv_nxt: int) -> list[int]:
        """Held sequence numbers by distance past ``rcv_nxt`` (those behind it last)."""
        return sorted(self.segments, key=lambda s: seq_diff(s, rcv_nxt))

    def sack_blocks(self, rcv_nxt: int) -> list[tuple[int, int]]:
        """Held ranges as (left, right) edges, the one with the newest segment first."""
        spans = sorted((seq_diff(s, rcv_nxt), len(d)) for s, (d, _) in self.segments.items())
        merged: list[list[int]] = []
        for rel, n in spans:
            if merged and rel <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], rel + n)
            else:
                merged.append([rel, rel + n])
        last = seq_diff(self.newest, rcv_nxt)
        merged.sort(key=lambda b: not b[0] <= last < b[1])
        return [(seq_add(rcv_nxt, a), seq_add(rcv_nxt, b)) for a, b in merged if b > a]
