"""The slirp4netns API's Unix socket, made before the rest of ``pyslirp.api`` is loaded.

Theory of operation
-------------------
podman connects to ``--api-socket`` as soon as it has the ready byte, so the
command line binds and listens here right after opening the TAP and before
it imports the engine (``pyslirp.cli``, "Start-up order"); connections wait
in the listen backlog until :class:`pyslirp.api.ApiServer` accepts them. This
module therefore imports only ``socket`` and :mod:`pyslirp.runtime.unixsock`
(the standard library's os, socket, stat and struct).
"""

from __future__ import annotations

import socket

from pyslirp.runtime import unixsock


class ApiError(OSError):
    """The API socket cannot be created; the message says why."""


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600; an old socket there is replaced."""
    try:
        return unixsock.bind_unix(path, socket.SOCK_STREAM, backlog=128)
    except unixsock.UnixSocketError as exc:
        raise ApiError(exc.errno, f"api socket {path}: {exc.why}") from None
