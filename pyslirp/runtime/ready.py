"""slirp4netns's ``-r FD``: tell the caller the network is up.

Theory of operation
-------------------
One byte, ``"1"``, is written to the ready fd, which is then closed: the
caller (podman, rootlesskit) reads it and goes on to start the container.
The command line writes it as soon as the TAP is configured (see "Start-up
order" in ``pyslirp.cli``), before the engine is imported, so this module
imports nothing beyond ``os`` and leaves logging to its caller.

A caller may stop us as soon as it has the byte (podman does when a container
exits at once), which is before the event loop and its signal handlers exist.
:func:`trap_stop_signals` makes SIGTERM, SIGINT and SIGHUP remembered instead of
fatal until then, and the runtime acts on :func:`early_signals` once its loop
runs, so that stop is as clean as any other (host sockets closed, the API
socket removed).

slirp4netns has no handler for those signals: it dies by them, and a caller's
``wait`` sees that (status 143 in a shell for SIGTERM). After its orderly
shutdown the drop-in does the same with :func:`die_by`, so a script written
against slirp4netns sees the status it expects; the exit fd (how podman and
rootlesskit stop it) gives 0 in both.
"""

from __future__ import annotations

import _signal
import contextlib
import os

#: Stop signals that arrived before the runtime's loop took them over.
_early: list[int] = []


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


def _remember(signum: int, _frame: object) -> None:  # (no typing import: start-up)
    _early.append(signum)


def trap_stop_signals() -> None:
    """Remember SIGTERM, SIGINT and SIGHUP instead of dying, until the loop takes over."""
    for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(signum, _remember)


def early_signals() -> list[int]:
    """The stop signals :func:`trap_stop_signals` caught so far (forgotten once taken)."""
    taken = list(_early)
    _early.clear()
    return taken


def die_by(signum: int) -> int:
    """End this process by ``signum`` with its default action, as an unhandled signal would.

    Returns 128 + ``signum`` (the shell's status for it) only if the process survived,
    e.g. because the signal is blocked in this thread."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _signal.signal(signum, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    return 128 + signum
