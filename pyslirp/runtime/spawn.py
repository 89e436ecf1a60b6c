"""Start a command in fresh user, network and mount namespaces (``pyslirp run -- CMD``).

Theory of operation
-------------------
:func:`spawn_isolated` forks a child that

1. unshares a new user namespace when we are not root (or when asked), maps
   our uid and gid to 0 inside (``setgroups`` denied first, as an unprivileged
   process must, user_namespaces(7)), so the command is "root" in namespaces it
   owns and nothing more outside;
2. unshares a new network namespace (holding only ``lo``, down) and a new
   mount namespace (and a UTS namespace when a hostname is given);
3. makes ``/`` recursively private *before* mounting anything, so that the next
   step cannot propagate to the host, then bind-mounts a private copy of the
   given resolv.conf text over ``/etc/resolv.conf`` (the copy is unlinked right
   after: the mount keeps it alive, nothing is left behind in /tmp);
4. sets ``PR_SET_PDEATHSIG`` (so it is killed when we die) and reports "ready"
   on a status pipe, then blocks on a release pipe;
5. when :meth:`IsolatedChild.release` is called (the TAP is open and the
   stack is serving), execs the command. A missing command exits 127, one that
   cannot be executed 126, with a shell-like message on stderr.

The parent waits for the "ready" byte before returning, so the child's
namespaces exist when the caller hands ``child.netns_target`` to
:func:`pyslirp.runtime.tap.open_tap` (``netns_type="pid"``). A setup failure
comes back as :class:`SpawnError` with a one-line message. If the parent
drops the child without releasing it, the release pipe reaches EOF and the
child exits without running the command.

Note on PDEATHSIG: it fires when the *thread* that forked exits, so fork
from a thread that lives as long as the process (the main thread).

What it deliberately does not do: no PID namespace (the command's children
stay visible to the host's process tools, as with slirp4netns's usage), no
cgroup or seccomp setup, no uid ranges beyond a single mapping.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import tempfile
import time

from pyslirp.runtime import netns

#: How long spawn_isolated waits for the child to finish its namespace setup.
SETUP_TIMEOUT = 30.0

_READY = b"R"
_ERROR = b"E"
_GO = b"G"


class SpawnError(OSError):
    """The isolated child could not be set up; the message is one line naming the cause."""


class IsolatedChild:
    """A child in its own namespaces, waiting for :meth:`release` before it execs."""

    netns_type = "pid"

    def __init__(self, pid: int, release_fd: int) -> None:
        self.pid = pid
        self._release_fd = release_fd
        self._status: int | None = None

    @property
    def netns_target(self) -> str:
        """What to pass as ``target`` to ``open_tap(..., netns_type="pid")``."""
        return str(self.pid)

    def release(self) -> None:
        """Let the child exec its command (the network is ready)."""
        if self._release_fd < 0:
            return
        try:
            os.write(self._release_fd, _GO)
        except BrokenPipeError:
            pass  # it already died; wait() reports how
        finally:
            os.close(self._release_fd)
            self._release_fd = -1

    def cancel(self) -> None:
        """Give up without running the command (e.g. the TAP failed): the child exits 1."""
        self._abandon()

    def _abandon(self) -> None:
        if self._release_fd >= 0:
            os.close(self._release_fd)
            self._release_fd = -1

    def poll(self) -> int | None:
        """The exit status if the child has ended (reaping it), else None."""
        if self._status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            self._record(status)
        return self._status

    def wait(self) -> int:
        """Block until the child ends; its status as a shell reports it (128+N for signal N)."""
        if self._status is None:
            _, status = os.waitpid(self.pid, 0)
            self._record(status)
        assert self._status is not None
        return self._status

    def _record(self, status: int) -> None:
        self._abandon()
        code = os.waitstatus_to_exitcode(status)
        self._status = 128 - code if code < 0 else code

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` unless the child was already reaped (its pid may be reused)."""
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def spawn_isolated(argv: list[str], resolv_conf: str | None, hostname: str | None = None, *,
                   userns: bool | None = None, die_with_parent: bool = True,
                   timeout: float = SETUP_TIMEOUT) -> IsolatedChild:
    """Fork a child in new namespaces that will exec ``argv`` once released.

    ``resolv_conf`` is the text to show as the child's /etc/resolv.conf (None
    leaves the host's). ``userns`` None means "a new user namespace unless we
    are root". Raises :class:`SpawnError` if the namespaces cannot be made.
    """
    if not argv:
        raise ValueError("spawn_isolated: empty command")
    use_userns = os.geteuid() != 0 if userns is None else userns
    uid, gid = os.geteuid(), os.getegid()
    parent_pid = os.getpid()
    status_r, status_w = os.pipe()
    release_r, release_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (status_r, status_w, release_r, release_w):
            os.close(fd)
        raise
    if pid == 0:  # pragma: no cover - runs in the forked child
        os.close(status_r)
        os.close(release_w)
        _child_main(argv, resolv_conf, hostname, use_userns, uid, gid, parent_pid,
                    die_with_parent, status_w, release_r)
    os.close(status_w)
    os.close(release_r)
    child = IsolatedChild(pid, release_w)
    try:
        reply = _read_status(status_r, timeout)
    except BaseException:
        child.kill(signal.SIGKILL)
        child.wait()
        raise
    finally:
        os.close(status_r)
    if reply != _READY:
        child.wait()
        if reply.startswith(_ERROR):
            raise SpawnError(reply[1:].decode(errors="replace"))
        raise SpawnError(f"isolated child exited during setup (status {child.wait()})")
    return child


def _read_status(fd: int, timeout: float) -> bytes:
    """Read the child's whole status message: "R", or "E" + text, or b"" if it died."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise SpawnError(f"isolated child did not finish its setup within {timeout:g} s")
        data = os.read(fd, 4096)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
        if chunks[0][:1] == _READY:
            return _READY


# ---------------------------------------------------------------------------- child side


def _child_main(argv: list[str], resolv_conf: str | None, hostname: str | None,
                use_userns: bool, uid: int, gid: int, parent_pid: int, die_with_parent: bool,
                status_w: int, release_r: int) -> None:  # pragma: no cover - forked child
    try:
        netns.forked_child_signal_hygiene()
        try:
            _setup(resolv_conf, hostname, use_userns, uid, gid)
            if die_with_parent:
                netns.set_pdeathsig(signal.SIGKILL)
                if os.getppid() != parent_pid:  # it died before the prctl took effect
                    os._exit(1)
        except OSError as exc:
            os.write(status_w, _ERROR + (exc.strerror or str(exc)).encode(errors="replace"))
            os._exit(1)
        os.write(status_w, _READY)
        os.close(status_w)
        if os.read(release_r, 1) != _GO:
            os._exit(1)  # the parent gave up on us
        os.close(release_r)
        _exec(argv)
    except BaseException as exc:  # noqa: BLE001 - e.g. KeyboardInterrupt while waiting
        with contextlib.suppress(OSError):
            os.write(2, f"pyslirp: isolated child: {type(exc).__name__}: {exc}\n".encode())
    finally:
        os._exit(1)


def _setup(resolv_conf: str | None, hostname: str | None, use_userns: bool, uid: int,
           gid: int) -> None:  # pragma: no cover - forked child
    if use_userns:
        try:
            netns.unshare(netns.CLONE_NEWUSER)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create a user namespace: {exc.strerror}") from None
        # setgroups must be denied before an unprivileged process may write gid_map.
        for path, text in (("/proc/self/setgroups", "deny"),
                           ("/proc/self/uid_map", f"0 {uid} 1"),
                           ("/proc/self/gid_map", f"0 {gid} 1")):
            try:
                with open(path, "w") as f:
                    f.write(text)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot write {path}: {exc.strerror}") from None
    flags = netns.CLONE_NEWNET | netns.CLONE_NEWNS
    if hostname is not None:
        flags |= netns.CLONE_NEWUTS
    try:
        netns.unshare(flags)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create network/mount namespaces: "
                                 f"{exc.strerror}") from None
    # Must succeed before any mount: a shared / would carry our bind mount to the host.
    try:
        netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot make / private: {exc.strerror}") from None
    if resolv_conf is not None:
        _bind_resolv_conf(resolv_conf)
    if hostname is not None:
        try:
            socket.sethostname(hostname)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot set hostname {hostname!r}: "
                                     f"{exc.strerror}") from None


def _bind_resolv_conf(text: str) -> None:  # pragma: no cover - forked child
    fd, path = tempfile.mkstemp(prefix="pyslirp-resolv-", suffix=".conf")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)  # mkstemp's 0600 would hide it from a command that drops root
        try:
            netns.mount(path, "/etc/resolv.conf", None, netns.MS_BIND)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind-mount a resolv.conf over /etc/resolv.conf: "
                                     f"{exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # the mount keeps the inode alive


def _exec(argv: list[str]) -> None:  # pragma: no cover - forked child
    # Python ignores these; an exec'd program must start with the defaults.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        os.write(2, f"pyslirp: {argv[0]}: command not found\n".encode(errors="replace"))
        os._exit(127)
    except OSError as exc:
        os.write(2, f"pyslirp: {argv[0]}: {exc.strerror}\n".encode(errors="replace"))
        os._exit(126)
