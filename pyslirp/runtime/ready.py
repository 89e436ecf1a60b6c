"""slirp4netns's ``-r FD``: tell the caller the network is up.

Theory of operation
-------------------
One byte, ``"1"``, is written to the ready fd, which is then closed: the
caller (podman, rootlesskit) reads it and goes on to start the container.
The command line writes it as soon as the TAP is configured (see "Start-up
order" in ``pyslirp.cli``), before the engine is imported, so this module
imports nothing beyond ``os`` and leaves logging to its caller.
"""

from __future__ import annotations

import contextlib
import os


def write_ready(fd: int | None) -> str | None:
    """Write "1" to the ready fd and close it; returns why that failed (to be logged), or None.

    None or a negative fd: nothing to do.
    """
    if fd is None or fd < 0:
        return None
    problem = None
    try:
        os.write(fd, b"1")
    except OSError as exc:
        problem = f"cannot write to ready fd {fd}: {exc.strerror}"
    with contextlib.suppress(OSError):
        os.close(fd)
    return problem
