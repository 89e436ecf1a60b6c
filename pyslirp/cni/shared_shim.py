"""The slirp4netns drop-in's shared mode, the caller's side: hand the TAP to the engine.

Theory of operation
-------------------
With ``PYSLIRP_SHARED_ENGINE=1`` (``pyslirp shim install --shared-engine``),
``pyslirp [OPTION]... PID TAPNAME`` does what a container's own process does
first (parse, open the TAP, bind ``--api-socket``: pyslirp.cli, "Start-up
order") and then, instead of importing the engine, hands the open TAP, the
bound API socket and the exit fd over ``RUNDIR/dropin.sock`` (``SCM_RIGHTS``)
to the calling user's engine, the CNI engine of :mod:`pyslirp.cni.daemon`
(started on demand exactly as the CNI plugin starts it, same runtime
directory and the same trust checks: :func:`pyslirp.cni.plugin.runtime_dir`,
:func:`~pyslirp.cni.plugin.prepare_runtime_dir`, ``SO_PEERCRED`` both ways).
The request is the command line itself (and the working directory, for
relative paths): the engine parses it with :func:`pyslirp.cli.parse_args`, so
every option means there what it means in the one-process mode
(:mod:`pyslirp.cni.shared_engine`).

Once the engine answers that it serves the attachment, this process keeps
nothing but the connection: it ``exec``s ``/bin/sh`` with :data:`WAITER`
(same PID, which the caller holds, signals and waits for; ~0.2 MB of private
memory instead of a Python interpreter's ~3 MB). The waiter writes the ready
byte once its signal traps are in place, then reads the connection:

* SIGTERM, SIGINT, SIGHUP: it writes ``stop``, the engine tears the
  attachment down (host ports, API socket, TAP) and answers; then the waiter
  dies by that signal, as slirp4netns and the one-process mode do;
* the exit fd (``-e``, watched by the engine): the engine tears down and
  writes ``exit``; exit 0;
* the attachment failed in the engine (its TAP went away): ``error MESSAGE``;
  the message goes to stderr, exit 1, as pyslirp's own process would;
* the connection closes with neither: the engine died; exit 1 with a message,
  as a crashed slirp4netns would. The waiter dying (even by SIGKILL) closes the
  connection, and the engine tears the attachment down.

A stop signal that comes before the ``exec`` is remembered
(:func:`pyslirp.runtime.ready.trap_stop_signals`) and acted on here; just before
the ``exec`` the handlers go back to the default, so a signal in the last
microseconds still ends the process (and with it the attachment) instead of
being lost. The ready byte comes after that, so a caller that waits for it
never sees the gap.

Imports: what the CNI plugin imports (``os``, ``sys``, ``_socket``, ``_json``),
nothing of asyncio or the stack (tests/startup_imports.json, ``shared_*``).
"""

from __future__ import annotations

import _signal
import _socket as socket
import os
import sys

from pyslirp.cni import plugin

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover - typing costs start-up time
    from pyslirp.runtime.tap import TapHandle

#: The socket of the engine's runtime directory that takes drop-in attachments.
DROPIN_SOCKET = "dropin.sock"
#: How long the caller waits for the engine to take the attachment.
ATTACH_TIMEOUT = plugin.ENGINE_REPLY_TIMEOUT
#: The fds the waiter finds its connection and the ready fd on.
CONN_FD = 3
READY_FD = 4

#: /bin/sh -c WAITER pyslirp HAVE_READY ENGINE_PID LOG_INFO (see the module doc).
WAITER = r"""trap '' PIPE
log_info=$3
stop() {
  [ "$log_info" = 1 ] && echo "pyslirp: INFO: received SIG$1, shutting down" >&2
  echo stop >&3; read -r _ <&3; trap - "$1"; kill -s "$1" $$; exit 1
}
trap 'stop TERM' TERM
trap 'stop INT' INT
trap 'stop HUP' HUP
if [ "$1" = 1 ]; then
  printf 1 >&4 || echo "pyslirp: WARNING: cannot write to the ready fd" >&2
  exec 4>&-
fi
while read -r word rest <&3; do
  case $word in
    exit) exit 0 ;;
    error) printf 'pyslirp: ERROR: %s\n' "$rest" >&2; exit 1 ;;
  esac
done
echo "pyslirp: ERROR: the shared engine (pid $2) serving this namespace is gone; \
the network is lost" >&2
exit 1
"""


class SharedError(Exception):
    """The engine could not be reached or refused the attachment; str is the reason."""


def dropin_path(rundir: str) -> str:
    return os.path.join(rundir, DROPIN_SOCKET)


def connect_dropin(rundir: str) -> tuple[socket.socket, int] | None:
    """(connection, engine pid) to the engine's drop-in socket; None if nobody listens.

    The peer must run as our uid or root, as the CNI plugin requires of engine.sock.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(dropin_path(rundir))
        pid, uid, _gid = plugin.peer_credentials(sock)
    except OSError:
        sock.close()
        return None
    if not plugin.trusted_uid(uid):
        sock.close()
        raise SharedError(f"refusing the engine on {dropin_path(rundir)}: it runs as uid {uid} "
                          f"(pid {pid}), not as uid {os.geteuid()} or root")
    return sock, pid


def _connect(rundir: str, environ: dict[str, str]) -> tuple[socket.socket, int]:
    """The drop-in connection, starting the engine (as the CNI plugin does) if none runs."""
    try:
        plugin.prepare_runtime_dir(rundir, create=True)
        found = connect_dropin(rundir)
        if found is None:
            # Starts it unless another caller just did; ping is answered once it listens,
            # and it listens on dropin.sock before engine.sock.
            plugin.engine_request(rundir, environ, {"op": "ping"})
            found = connect_dropin(rundir)
    except plugin.CniError as exc:
        raise SharedError(exc.msg) from None
    except OSError as exc:
        raise SharedError(f"cannot reach the pyslirp engine in {rundir}: {exc}") from None
    if found is None:
        raise SharedError(f"the pyslirp engine in {rundir} does not take drop-in attachments "
                          f"(no {DROPIN_SOCKET}); see {rundir}/engine.log")
    return found


def _send_request(sock: socket.socket, request: dict[str, object], fds: list[int]) -> None:
    data = plugin.dumps(request).encode() + b"\n"
    rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])


def _read_line(sock: socket.socket) -> bytes:
    """One line from the engine, and not a byte more (the waiter reads what follows)."""
    line = b""
    while not line.endswith(b"\n"):
        peek = sock.recv(4096, socket.MSG_PEEK)
        if not peek:
            raise SharedError("the pyslirp engine closed the connection without an answer; "
                              "see its engine.log")
        end = peek.find(b"\n")
        line += sock.recv(len(peek) if end < 0 else end + 1)
    return line


def attach(argv: list[str], tap: TapHandle, listener: object, exit_fd: int | None,
           environ: dict[str, str]) -> tuple[socket.socket, int]:
    """Hand the TAP (and API socket, exit fd) to the engine; (connection, engine pid)."""
    rundir = plugin.runtime_dir(environ)
    sock, engine_pid = _connect(rundir, environ)
    fds = [tap.fd]
    kinds = ["tap"]
    if listener is not None:
        fds.append(listener.fileno())  # type: ignore[attr-defined]
        kinds.append("api")
    if exit_fd is not None:
        fds.append(exit_fd)
        kinds.append("exit")
    request = {"op": "attach", "argv": argv, "cwd": os.getcwd(), "fds": kinds,
               "tap": {"name": tap.name, "vnet_hdr": tap.vnet_hdr, "offload": tap.offload},
               "pid": os.getpid()}
    try:
        sock.settimeout(ATTACH_TIMEOUT)
        _send_request(sock, request, fds)
        reply = plugin.loads(_read_line(sock).decode())
    except TimeoutError:
        sock.close()
        raise SharedError(f"the pyslirp engine (pid {engine_pid}) did not answer within "
                          f"{ATTACH_TIMEOUT:g} s") from None
    except (OSError, ValueError) as exc:
        sock.close()
        raise SharedError(f"talking to the pyslirp engine (pid {engine_pid}) failed: "
                          f"{exc}") from None
    except SharedError:
        sock.close()
        raise
    if not isinstance(reply, dict) or not reply.get("ok"):
        sock.close()
        msg = reply.get("msg") if isinstance(reply, dict) else None
        raise SharedError(str(msg or "the pyslirp engine refused the attachment"))
    sock.settimeout(None)
    return sock, engine_pid


def stop_now(sock: socket.socket) -> None:
    """Tear the attachment down at once (a stop signal came before the waiter ran)."""
    try:
        sock.sendall(b"stop\n")
        sock.recv(64)
    except OSError:
        pass
    sock.close()


def _move_fd(fd: int, target: int) -> None:
    """``fd`` becomes ``target`` (inheritable); ``fd`` is closed."""
    os.dup2(fd, target)
    os.close(fd)


def exec_waiter(sock: socket.socket, ready_fd: int | None, engine_pid: int,
                log_info: bool = True) -> None:
    """Become :data:`WAITER` (never returns)."""
    import fcntl  # the C module: cheap

    detached = sock.detach()
    conn = fcntl.fcntl(detached, fcntl.F_DUPFD_CLOEXEC, 10)  # off 3 and 4 first
    os.close(detached)
    ready = -1
    if ready_fd is not None and ready_fd >= 0:
        try:
            ready = fcntl.fcntl(ready_fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(ready_fd)
        except OSError as exc:  # not open: as in one-process mode, a warning, nothing else
            print(f"pyslirp: WARNING: cannot write to ready fd {ready_fd}: {exc.strerror}",
                  file=sys.stderr)
            ready = -1
    _move_fd(conn, CONN_FD)
    if ready >= 0:
        _move_fd(ready, READY_FD)
    os.execv("/bin/sh", ["pyslirp", "-c", WAITER, "pyslirp", "1" if ready >= 0 else "0",
                         str(engine_pid), "1" if log_info else "0"])


def serve_shared(argv: list[str], tap: TapHandle, listener: object, *, ready_fd: int | None,
                 exit_fd: int | None, sandbox: bool, log_info: bool = True) -> int:
    """The shared mode of ``pyslirp [OPTION]... PID TAPNAME`` (``argv``, parsed already into
    the other arguments); returns only on failure."""
    from pyslirp.runtime.ready import die_by, early_signals

    environ = dict(os.environ)
    try:
        sock, engine_pid = attach(argv, tap, listener, exit_fd, environ)
    except (SharedError, plugin.CniError) as exc:
        print(f"pyslirp: ERROR: {getattr(exc, 'msg', exc)}", file=sys.stderr)
        return 1
    finally:
        # The engine holds its own copies now; the TAP must go away with the engine's.
        tap.close()
        if listener is not None:
            listener.close()  # type: ignore[attr-defined]
        if exit_fd is not None:
            try:  # noqa: SIM105 - as in plugin.py: no contextlib on this path
                os.close(exit_fd)
            except OSError:
                pass
    if sandbox:
        print("pyslirp: WARNING: --enable-sandbox with the shared engine: the engine runs "
              "under its seccomp filter but without a mount sandbox (docs/shared-engine.md)",
              file=sys.stderr)
    early = early_signals()
    if early:
        stop_now(sock)
        return die_by(early[0])
    for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP):
        _signal.signal(signum, _signal.SIG_DFL)
    early = early_signals()
    if early:  # came in while the handlers were being reset
        stop_now(sock)
        return die_by(early[0])
    exec_waiter(sock, ready_fd, engine_pid, log_info)
    return 1  # pragma: no cover - execv does not return
