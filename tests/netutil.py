"""Host-side network helpers shared by the tests (they only ever use the loopback).

Only the standard library is imported, so that scripts the tests run outside pytest
(``tests/e2e/servers.py``) can use this module too.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(*kinds: int) -> int:
    """A port on 127.0.0.1 that no socket of any of ``kinds`` holds right now.

    ``kinds`` are socket types (default: ``SOCK_STREAM`` alone); pass
    ``SOCK_STREAM, SOCK_DGRAM`` for one port a TCP and a UDP server can share. The
    kernel picks the port (a bind to port 0, so it is in the ephemeral range) and the
    probe sockets are closed before it is returned: the caller should bind it at once.
    """
    first, *others = kinds or (socket.SOCK_STREAM,)
    while True:
        with socket.socket(socket.AF_INET, first) as probe:
            probe.bind((LOOPBACK, 0))
            port: int = probe.getsockname()[1]
            if all(_bindable(kind, port) for kind in others):
                return port


def _bindable(kind: int, port: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
        return True
