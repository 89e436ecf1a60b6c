"""Keep glibc from handing the relay's buffers back to the kernel after every use.

Theory of operation
-------------------
Each read from a host socket is a fresh ``bytes`` of up to 256 KB, held in a
flow's send queue until the guest acknowledges it. Such sizes are above
glibc's default mmap threshold (128 KB) or land at the top of the heap, which
glibc trims as soon as 128 KB there are free: so nearly every read paid for
an ``mmap``/``brk`` and then a page fault per 4 KB as the kernel copied into
new pages. Measured with ``strace -c`` on a download: one ``brk`` per
``recvfrom`` before, none after, and ``recvfrom`` itself 81 -> 52 us per call.

Raising the thresholds (``mallopt``) keeps freed memory in the process for
reuse. What stays resident is bounded by the flows' own buffer limits; the
trim threshold caps what is kept beyond them.

Only glibc has ``mallopt``; anywhere else this does nothing.

:func:`freeze_startup_objects` does the same kind of thing for Python's cyclic
garbage collector: the ~100k objects that imports and start-up create never
die, yet every full collection walks them all, which showed as millisecond
stalls in the round-trip p99. ``gc.freeze()`` moves them out of its sight, and
a larger young-generation threshold makes collections rarer (the per-packet
objects are views and tuples that reference counting frees anyway).
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("pyslirp")

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20
TOP_PAD = 4 << 20


def tune() -> bool:
    """Apply the thresholds; False when this is not glibc."""
    try:
        # glibc by its soname: ctypes.util.find_library would run ``ldconfig -p`` at start-up.
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.debug("mallopt refused a threshold; keeping the allocator's defaults")
    return ok


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def freeze_startup_objects() -> None:
    """Call once start-up is done: exempt what exists now from future collections.

    Also turns the collector on: the command line turns it off while it starts
    (pyslirp.cli, "Start-up order"), since the imports' ~40 young-generation
    collections find next to nothing and cost milliseconds before the ready byte.
    """
    gc.collect()
    gc.freeze()
    gc.enable()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
