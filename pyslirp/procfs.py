"""What /proc says about a process, for telling a live process from a reused PID.

Imports nothing, so the CNI plugin executable (which keeps
its imports small) and the runtime can both use it.
"""

from __future__ import annotations


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if no live such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2:].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        return None  # a zombie is dead, whoever has yet to reap it
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None
