"""The send queue: host bytes not yet acknowledged by the guest, and the frames cut from it.

Theory of operation
-------------------
What the runtime reads from a host socket is kept as a deque of immutable
``bytes`` chunks, addressed by *stream position* (bytes since the flow
began, not sequence numbers, so no wrap): ``head_pos`` is where the first
chunk starts, ``acked_pos`` the first byte the guest has not acknowledged
and ``end_pos`` the end of what is queued. Chunks are never copied again
once queued, except that a small read is appended to a small last chunk so
one frame never needs many iovecs.

:meth:`SendQueue.slices` returns the pieces covering ``[pos, pos + n)`` as
whole chunks or ``memoryview`` slices of them; since chunks never change,
the link may hold those as long as it likes. A cursor remembers the chunk
where the last slice began, so cutting consecutive frames does not walk the
deque from the head each time. :meth:`SendQueue.release` drops what the
guest acknowledged, whole chunks only (a partly acknowledged chunk stays
until all of it is).

An idle flow holds no deque: ``chunks`` is the empty tuple until the first
append and again once everything queued is acknowledged (a deque costs
~760 bytes even empty, a whole idle connection's worth). Truth, ``len()``
and iteration work on either, so readers need not care which it is.

The TCP engine reads the three positions directly (attributes, not calls)
on its per-frame path; append, release and slices are one call each.
"""

from __future__ import annotations

from collections import deque
from typing import Any

#: Reads shorter than this are appended to a last chunk that is also shorter.
COALESCE_BELOW = 32768


class SendQueue:
    """Unacknowledged host data of one flow, as immutable chunks."""

    __slots__ = ("chunks", "head_pos", "acked_pos", "end_pos", "cursor_index", "cursor_pos")

    def __init__(self) -> None:
        #: The queued chunks; the empty tuple while nothing is queued (see above).
        self.chunks: deque[bytes] | tuple[()] = ()
        #: Stream position of the first byte of ``chunks[0]``.
        self.head_pos = 0
        #: Stream position of the first byte not yet acknowledged.
        self.acked_pos = 0
        #: Stream position just past the last byte queued.
        self.end_pos = 0
        #: Index in ``chunks`` and stream position of the chunk the last slice began in.
        self.cursor_index = 0
        self.cursor_pos = 0

    @property
    def unacked(self) -> int:
        """Bytes queued and not yet acknowledged."""
        return self.end_pos - self.acked_pos

    def append(self, data: bytes) -> None:
        """Queue ``data`` (kept by reference unless coalesced with a small last chunk)."""
        chunks = self.chunks
        n = len(data)
        if not chunks:
            self.chunks = deque((data,))
        elif n < COALESCE_BELOW and len(chunks[-1]) < COALESCE_BELOW:
            chunks[-1] = chunks[-1] + data
        else:
            chunks.append(data)
        self.end_pos += n

    def slices(self, pos: int, n: int) -> list[Any]:
        """Pieces (chunks or memoryviews of them) covering stream bytes [pos, pos + n).

        ``[pos, pos + n)`` must lie within ``[head_pos, end_pos)``.
        """
        chunks = self.chunks
        if pos >= self.cursor_pos and self.cursor_index < len(chunks):
            i, start = self.cursor_index, self.cursor_pos
        else:
            i, start = 0, self.head_pos
        chunk = chunks[i]
        size = len(chunk)
        while pos >= start + size:
            start += size
            i += 1
            chunk = chunks[i]
            size = len(chunk)
        self.cursor_index, self.cursor_pos = i, start
        parts: list[Any] = []
        while n > 0:
            offset = pos - start
            take = size - offset
            if take > n:
                take = n
            parts.append(chunk if take == size else memoryview(chunk)[offset:offset + take])
            n -= take
            pos += take
            if n:
                start += size
                i += 1
                chunk = chunks[i]
                size = len(chunk)
        return parts

    def release(self, n: int) -> None:
        """The guest acknowledged ``n`` more bytes: drop the chunks now wholly acknowledged."""
        acked = self.acked_pos = self.acked_pos + n
        chunks = self.chunks
        popped = 0
        while chunks and self.head_pos + len(chunks[0]) <= acked:
            self.head_pos += len(chunks.popleft())
            popped += 1
        if popped:
            self.cursor_index -= popped
            if self.cursor_index < 0:
                self.cursor_index, self.cursor_pos = 0, self.head_pos
            if not chunks:
                self.chunks = ()  # all acknowledged: an idle flow keeps no deque

    def clear(self) -> None:
        """Forget everything queued (the flow is gone): all of it counts as released."""
        self.acked_pos = self.head_pos = self.end_pos
        self.cursor_index, self.cursor_pos = 0, self.end_pos
        self.chunks = ()
