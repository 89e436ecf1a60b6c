"""Owner-only Unix sockets, and who is at the other end of one.

Theory of operation
-------------------
Every Unix socket pyslirp listens on (the slirp4netns API socket, the QEMU
stream and datagram sockets, the CNI engine's) lets whoever connects steer
a guest's network, so the file is owner-only (0600) from the moment it
exists: the socket inode's mode is set with ``fchmod`` before ``bind``
(Linux creates the file with that mode minus the umask), never by changing
the process-wide umask. A stale socket at the path (left by a killed
process) is replaced; anything else there is refused, so a typo can never
delete somebody's file. Whom to answer is decided from the kernel's word
on the peer (``SO_PEERCRED``).

This module imports only the standard library's contextlib, os, stat, struct and the C
``_socket`` (``socket`` itself, which pulls in enum, ~8 ms, only when a
socket is bound), so the command line can bind the API socket before it
loads the engine and the CNI plugin can check the engine's credentials
without paying for ``socket``.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import os
import stat
import struct

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    import socket

#: The socket file's mode: only its owner (and root) may connect.
SOCKET_MODE = 0o600
#: struct ucred (SO_PEERCRED): pid, uid, gid.
_UCRED = struct.Struct("iII")


class UnixSocketError(OSError):
    """No socket could be made at ``path``; ``why`` says why ("cannot listen on PATH: WHY")."""

    def __init__(self, err: int, path: str, why: str) -> None:
        super().__init__(err, f"cannot listen on {path}: {why}")
        self.path = path
        self.why = why


def bind_unix(path: str, kind: int = _socket.SOCK_STREAM, backlog: int = 128) -> socket.socket:
    """A non-blocking Unix socket of ``kind`` bound at ``path``, mode 0600, listening if a stream.

    Raises :class:`UnixSocketError`.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UnixSocketError(exc.errno or errno.EINVAL, path, exc.strerror or str(exc)) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise UnixSocketError(errno.EEXIST, path, "exists and is not a socket")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    import socket  # noqa: PLC0415 (see the module docstring)

    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        sock.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UnixSocketError(getattr(exc, "errno", None) or errno.EINVAL, path, why) from None
    return sock


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a connected Unix socket's peer, as the kernel recorded them."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid
