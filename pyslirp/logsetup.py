"""Logging for every pyslirp process: one line per event on stderr.

Front ends (the command line, the KubeVirt sidecar) call :func:`setup_logging`
once they know the level; the runtime and the stack only ever log through
``logging.getLogger("pyslirp")`` and its children.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

PROG = "pyslirp"
DEFAULT_LOG_LEVEL = "info"
LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
LOG_FORMAT = f"{PROG}: %(levelname)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


_handler: logging.Handler | None = None


def setup_logging(level: str = DEFAULT_LOG_LEVEL) -> None:
    """One line per event on stderr as ``pyslirp: LEVEL: message``; idempotent.

    ``level`` applies to pyslirp's loggers; other libraries' loggers (asyncio,
    grpc) never go below WARNING, so ``debug`` shows only what is ours.
    """
    global _handler
    root = logging.getLogger()
    remove_handler()
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(_handler)
    root.setLevel(max(logging.WARNING, LOG_LEVELS[level]))
    logging.getLogger(PROG).setLevel(LOG_LEVELS[level])


def remove_handler() -> None:
    """Take our stderr handler off the root logger again (tests)."""
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
