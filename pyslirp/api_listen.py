"""The slirp4netns API's Unix socket, made before the rest of ``pyslirp.api`` is loaded.

Theory of operation
-------------------
podman connects to ``--api-socket`` as soon as it has the ready byte, so the
command line binds and listens here right after opening the TAP and before
it imports the engine (``pyslirp.cli``, "Start-up order"); connections wait
in the listen backlog until :class:`pyslirp.api.ApiServer` accepts them. This
module therefore imports only ``os``, ``stat``, ``socket`` and ``contextlib``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat


class ApiError(OSError):
    """The API socket cannot be created; the message says why."""


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600; an old socket there is replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ApiError(exc.errno, f"api socket {path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiError(17, f"api socket {path}: exists and is not a socket")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # umask is process-wide, but nothing else creates files while we start up.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except (OSError, ValueError) as exc:
        sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ApiError(getattr(exc, "errno", None) or 22, f"api socket {path}: {why}") from None
    finally:
        os.umask(old)
    sock.listen(128)
    sock.setblocking(False)
    return sock
