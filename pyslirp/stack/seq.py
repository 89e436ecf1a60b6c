"""TCP sequence-number arithmetic (RFC 9293 3.4): 32-bit, modulo 2**32.

Theory of operation
-------------------
Sequence numbers wrap, so "before" and "after" are only defined for numbers
less than half the space apart (RFC 1982 serial arithmetic). These helpers
name the operations the TCP engine needs; each is one masked expression.

The per-frame path of :mod:`pyslirp.stack.tcp` (``_segment``, ``_ack_field``,
``_acked``, ``_output``, ``_xmit``, ``_window``) writes the same expressions
inline with :data:`SEQ_MASK` and :data:`SEQ_HALF`, because a Python call per
comparison there is counted by tests/test_hotpath_budget.py; everywhere else
uses the helpers.
"""

from __future__ import annotations

#: Sequence numbers are taken modulo 2**32: ``& SEQ_MASK`` after arithmetic.
SEQ_MASK = 0xFFFFFFFF
#: Half the space: a distance at or past it means "behind", not "ahead".
SEQ_HALF = 0x80000000


def seq_add(seq: int, n: int) -> int:
    """``seq + n`` modulo 2**32 (``n`` may be negative)."""
    return (seq + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """How far ``a`` lies past ``b``, in 0 .. 2**32 - 1 (``a - b`` modulo 2**32)."""
    return (a - b) & SEQ_MASK


def seq_lt(a: int, b: int) -> bool:
    """``a`` comes strictly before ``b``."""
    return 0 < ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_le(a: int, b: int) -> bool:
    """``a`` comes before ``b`` or is ``b``."""
    return ((b - a) & SEQ_MASK) < SEQ_HALF


def seq_window(right_edge: int, left_edge: int) -> int:
    """Bytes from ``left_edge`` up to ``right_edge``; 0 if the right edge is behind.

    A window whose right edge fell behind (the peer moved past what was
    advertised, or it was shrunk) offers nothing rather than ~4 GB.
    """
    d = (right_edge - left_edge) & SEQ_MASK
    return 0 if d >= SEQ_HALF else d
