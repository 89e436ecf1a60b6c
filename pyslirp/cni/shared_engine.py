"""The slirp4netns drop-in's shared mode, the engine's side: serve handed-over TAPs.

Theory of operation
-------------------
The CNI engine (:mod:`pyslirp.cni.daemon`) also listens on
``RUNDIR/dropin.sock`` (owner-only, in the 0700 runtime directory; clients of
another uid than ours or root are refused, ``SO_PEERCRED``). A caller in the
shared mode (:mod:`pyslirp.cni.shared_shim`) connects, sends one JSON line
with the open TAP, the bound ``--api-socket`` listener and the exit fd as
``SCM_RIGHTS``, and keeps the connection open for the attachment's life.

The request carries the caller's command line, which is parsed here with
:func:`pyslirp.cli.parse_args`, and the :class:`~pyslirp.runtime.spec.ServeSpec`
is built from it by the same :meth:`pyslirp.cli.Options.serve_spec` as in the
one-process mode: MTU, CIDR, ``--disable-host-loopback``, ``--disable-dns``,
``--dns-upstream``, ``-6``/``--cidr6``, ``--outbound-addr[6]``, ``--pcap``,
``--busy-poll``, ``--max-buffered`` and ``--api-socket`` (the JSON API with its
port forwards, :mod:`pyslirp.api`) all mean the same. Relative paths are the
caller's (its working directory comes along). Each attachment is one
:class:`~pyslirp.runtime.attachment.Attachment` on the engine's loop, as a CNI
one is; without ``--dns-upstream`` it follows the engine's resolv.conf watcher.

Its end, each written to the connection before it is closed:

* the caller writes ``stop`` (a stop signal) or closes the connection (it was
  killed): the attachment is torn down (API socket closed and removed, host
  ports closed, flows reset, the TAP's last fd closed) and ``done`` answered;
* the exit fd becomes readable: torn down, ``exit``;
* the TAP goes away (its namespace ended): torn down, ``error MESSAGE``;
* the engine stops (SIGTERM): every attachment is torn down with
  ``error MESSAGE``; if it dies, the closed connection says so.

What differs from the one-process mode is listed in docs/shared-engine.md:
the hardening flags (``--enable-seccomp`` is the engine's own filter, always on,
and a request asking for it is refused by an engine without one; the engine has
no mount sandbox, so ``--enable-sandbox`` gets the caller a warning) and the
log (one ``engine.log`` with the engine's level, not the caller's stderr and
``--log-level``).
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyslirp.cni.shared_shim import DROPIN_SOCKET

if TYPE_CHECKING:
    from pyslirp.cli import Options

log = logging.getLogger("pyslirp.cni")

#: A request line longer than this is refused (a command line is far shorter).
MAX_REQUEST = 256 * 1024
#: At most this many fds come with a request (TAP, API socket, exit fd).
MAX_FDS = 3
#: Seconds a client has to send its request (as on engine.sock).
REQUEST_TIMEOUT = 30.0


class DropinError(Exception):
    """The attachment cannot be served; str is the reason the caller prints."""


class DropinAttachment:
    """One caller's namespace served by the engine, alive as long as its connection."""

    def __init__(self, conn: socket.socket, caller_pid: int, attachment: Any, tap_fd: int,
                 explicit_dns: bool) -> None:
        self.conn = conn
        self.caller_pid = caller_pid
        self.attachment = attachment
        self.tap_fd = tap_fd
        self.explicit_dns = explicit_dns
        self.forwarder: Any = None
        self.api: Any = None
        self.exit_fd = -1
        self.closed = False

    @property
    def name(self) -> str:
        return f"pid {self.caller_pid} {self.attachment.name}"


class DropinServer:
    """Takes drop-in attachments on ``RUNDIR/dropin.sock`` for the engine."""

    def __init__(self, loop: Any, rundir: str, on_idle: Callable[[], None],
                 close_fds: Callable[[list[int], Callable[[], None]], None],
                 refuse_peer: Callable[[socket.socket, str], str | None]) -> None:
        self.loop = loop
        self.rundir = rundir
        self.served: dict[int, DropinAttachment] = {}
        self._on_idle = on_idle
        #: The engine's SO_PEERCRED rule (the same for engine.sock): why a client is refused.
        self._refuse_peer = refuse_peer
        #: The engine's way of closing TAP fds off the loop, then calling back.
        self._close_fds = close_fds
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._pending: dict[int, tuple[socket.socket, bytearray, list[int]]] = {}
        #: Connections of peers that may not attach: their request gets this answer.
        self._refused: dict[int, str] = {}
        self._dns: list[tuple[str, int]] = []
        self._search: list[str] = []
        #: Whether the engine runs under its seccomp filter (daemon.serve sets it): a
        #: caller asking for --enable-seccomp is refused by an engine without one.
        self.filtered = False

    # ---- listening ------------------------------------------------------------------
    def listen(self) -> None:
        path = os.path.join(self.rundir, DROPIN_SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # the engine lock is ours: any socket here is a dead engine's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        sock.setblocking(False)
        self._sock = sock
        self._ino = os.stat(path).st_ino
        self.loop.add_reader(sock.fileno(), self._on_accept)

    def stop_listening(self) -> None:
        if self._sock is None:
            return
        self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        path = os.path.join(self.rundir, DROPIN_SOCKET)
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == self._ino:
                os.unlink(path)

    def _on_accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("dropin.sock: accept failed: %s", exc)
                return
            refusal = self._refuse_peer(conn, DROPIN_SOCKET)
            if refusal is not None:
                log.warning("%s", refusal)
                # Answered once its request is in (as engine.sock does): a client that
                # writes before it reads then gets this answer, not a broken pipe.
                self._refused[conn.fileno()] = refusal
            conn.setblocking(False)
            self._pending[conn.fileno()] = (conn, bytearray(), [])
            self.loop.call_later(5.0 if refusal else REQUEST_TIMEOUT, self._expire,
                                 conn.fileno(), conn)
            # One reader for the connection's whole life (the request, then the caller's
            # stop or EOF): no remove/add of a reader on one fd within a callback.
            self.loop.add_reader(conn.fileno(), self._on_readable, conn.fileno())

    def _on_readable(self, key: int) -> None:
        served = self.served.get(key)
        if served is not None:
            self._on_caller_data(served)
        elif key in self._pending:
            self._on_request_data(key)

    def _expire(self, key: int, conn: socket.socket) -> None:
        """A connection that sent no complete request in time is dropped."""
        pending = self._pending.get(key)
        if pending is None or pending[0] is not conn:
            return  # answered meanwhile (the fd may serve another connection by now)
        del self._pending[key]
        log.warning("%s", self._refused.pop(key, None) or
                    "dropin.sock: a client sent no request in time")
        self.loop.remove_reader(key)
        _close_all(pending[2])
        conn.close()

    # ---- the request ----------------------------------------------------------------
    def _on_request_data(self, key: int) -> None:
        conn, buf, fds = self._pending[key]
        try:
            data, ancdata, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * MAX_FDS))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, ancdata, flags = b"", [], 0
            log.warning("dropin.sock: %s", exc)
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(raw[:len(raw) - len(raw) % received.itemsize])
                fds.extend(received)
        buf += data
        problem = None
        if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
            problem = f"more than {MAX_FDS} fds came with the request"
        elif len(buf) > MAX_REQUEST:
            problem = "the request is too long"
        elif not data and not buf.endswith(b"\n"):
            problem = "the caller closed before its request was complete"
        elif not buf.endswith(b"\n"):
            return  # more to come
        del self._pending[key]
        refusal = self._refused.pop(key, None)
        if refusal is not None:
            problem = refusal
        elif problem is None:
            try:
                self._attach(conn, json.loads(buf), fds)
                return
            except (DropinError, ValueError, TypeError, KeyError) as exc:
                problem = str(exc)
            except OSError as exc:  # e.g. the --pcap file cannot be made
                problem = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            except Exception as exc:  # noqa: BLE001 - one request must not take the engine down
                log.exception("drop-in attachment failed")
                problem = f"pyslirp engine error: {type(exc).__name__}: {exc}"
        if refusal is None:
            log.warning("drop-in attachment refused: %s", problem)
        self.loop.remove_reader(key)
        _close_all(fds)
        _send_line(conn, {"ok": False, "msg": problem})
        conn.close()

    def _attach(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """Serve the request's TAP; on any error its fds are the caller's to close."""
        kinds = request.get("fds")
        if request.get("op") != "attach" or not isinstance(kinds, list) or \
                len(kinds) != len(fds) or "tap" not in kinds:
            raise DropinError(f"bad drop-in request: op {request.get('op')!r}, fds {kinds!r} "
                              f"with {len(fds)} descriptors")
        named = dict(zip(kinds, fds, strict=True))
        served = self._build(conn, request, named)
        # From here on the fds are the attachment's.
        fds.clear()
        self.served[conn.fileno()] = served
        _send_line(conn, {"ok": True})
        log.info("drop-in attachment %s served (%d now)", served.name, len(self.served))

    def _build(self, conn: socket.socket, request: dict[str, Any],
               fds: dict[str, int]) -> DropinAttachment:
        from pyslirp.cli import InfoRequested, UsageError, parse_args

        argv, cwd, tap = request["argv"], request["cwd"], request["tap"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or \
                not isinstance(cwd, str) or not isinstance(tap, dict):
            raise DropinError("bad drop-in request: argv, cwd or tap malformed")
        try:
            opts = parse_args(argv)
        except (UsageError, InfoRequested) as exc:
            raise DropinError(f"the engine cannot parse the command line: {exc}") from None
        if opts.enable_seccomp and not self.filtered:
            raise DropinError("--enable-seccomp: the shared engine runs without a seccomp "
                              "filter (see its engine.log); unset PYSLIRP_SHARED_ENGINE to "
                              "run a filtered process of its own")
        for attr in ("api_socket", "pcap"):
            value = getattr(opts, attr)
            if value:
                setattr(opts, attr, os.path.join(cwd, value))
        listener = socket.socket(fileno=fds["api"]) if "api" in fds else None
        try:
            return self._serve(conn, request, fds, opts, listener)
        except BaseException:
            if listener is not None:
                listener.detach()  # the fd stays the request's, closed by the caller of _attach
            raise

    def _serve(self, conn: socket.socket, request: dict[str, Any], fds: dict[str, int],
               opts: Options, listener: socket.socket | None) -> DropinAttachment:
        from pyslirp.runtime.attachment import Attachment
        from pyslirp.runtime.device import TapDevice
        from pyslirp.runtime.pcap import PcapWriter
        from pyslirp.stack.config import ConfigError

        tap = request["tap"]
        try:
            spec = opts.serve_spec(ready_signalled=True, api_listener=listener)
            config = spec.fresh_config()
        except ConfigError as exc:
            raise DropinError(str(exc)) from None
        config.vnet_hdr = bool(tap.get("vnet_hdr"))
        config.offload = bool(tap.get("offload"))
        explicit_dns = bool(spec.dns_upstreams)
        if not explicit_dns and not config.disable_dns:
            config.dns_upstreams = list(self._dns)
            config.search_domains[:] = self._search
        pcap = PcapWriter(spec.pcap, strip_vnet=config.vnet_hdr) if spec.pcap else None
        caller = request.get("pid")
        pid = caller if isinstance(caller, int) else -1
        box: list[DropinAttachment] = []

        def on_fatal(message: str) -> None:  # the TAP is gone (its namespace ended)
            if box:
                self._end(box[0], f"error {message}")

        attachment = Attachment(self.loop, TapDevice(fds["tap"], str(tap.get("name", "tap0"))),
                                config, pcap=pcap, on_fatal=on_fatal)
        served = DropinAttachment(conn, pid, attachment, fds["tap"], explicit_dns)
        box.append(served)
        host = attachment.host.outbound
        host.ipv4, host.ipv6 = spec.outbound_addr, spec.outbound_addr6
        if spec.api is not None:
            from pyslirp.runtime.hostfwd import serve_api

            try:
                served.forwarder, served.api = serve_api(
                    attachment, spec.api, str(config.network.network_address + 100))
            except OSError as exc:
                attachment.close()
                raise DropinError(str(exc)) from None
        if "exit" in fds:
            served.exit_fd = fds["exit"]
            os.set_blocking(served.exit_fd, False)
            self.loop.add_reader(served.exit_fd, self._end, served, "exit")
        return served

    # ---- DNS (the engine's resolv.conf watcher) ---------------------------------------
    def set_dns(self, upstreams: list[tuple[str, int]], search: list[str]) -> None:
        self._dns, self._search = list(upstreams), list(search)
        for served in self.served.values():
            if not served.explicit_dns and not served.attachment.config.disable_dns:
                served.attachment.stack.set_dns_upstreams(upstreams)
                served.attachment.config.search_domains[:] = search

    # ---- the end ----------------------------------------------------------------------
    def _on_caller_data(self, served: DropinAttachment) -> None:
        try:
            data = served.conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        # "stop" or the caller gone (EOF): either way the attachment ends.
        if not data or b"\n" in data:
            self._end(served, "done")

    def _end(self, served: DropinAttachment, last_line: str, *, now: bool = False) -> None:
        """Tear ``served`` down; ``last_line`` goes to the caller once the TAP is gone.

        The TAP's last fd is closed off the loop (the engine's ``close_fds``: it waits for
        the kernel), unless ``now`` (the engine is stopping and the loop with it).
        """
        if served.closed:
            return
        served.closed = True
        last_line = " ".join(last_line.split())  # one line: the waiter reads up to "\n"
        self.served.pop(served.conn.fileno(), None)
        self.loop.remove_reader(served.conn.fileno())
        if served.exit_fd >= 0:
            self.loop.remove_reader(served.exit_fd)
        log.info("drop-in attachment %s ends: %s", served.name, last_line)
        for part in (served.api, served.forwarder, served.attachment):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        fds = [served.tap_fd] + ([served.exit_fd] if served.exit_fd >= 0 else [])

        def answer() -> None:
            served.conn.setblocking(True)
            with contextlib.suppress(OSError):
                served.conn.sendall(last_line.encode() + b"\n")
            served.conn.close()
            if not self.served:
                self._on_idle()

        if now:
            _close_all(fds)
            answer()
        else:
            self._close_fds(fds, answer)

    def shutdown(self, why: str) -> None:
        """The engine stops: end every attachment (their callers exit with ``why``)."""
        self.stop_listening()
        for conn, _buf, fds in self._pending.values():
            _close_all(fds)
            conn.close()
        self._pending.clear()
        self._refused.clear()
        for served in list(self.served.values()):
            self._end(served, f"error {why}", now=True)


def _send_line(conn: socket.socket, reply: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.setblocking(True)
        conn.settimeout(5.0)
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.setblocking(False)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()

