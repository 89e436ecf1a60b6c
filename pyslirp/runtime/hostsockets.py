"""The host side of an attachment: the stack's HostPort, made of non-blocking host sockets.

Theory of operation
-------------------
:class:`HostSockets` implements :class:`~pyslirp.stack.host.HostPort` for one
attachment (:mod:`pyslirp.runtime.attachment`): it turns the stack's requests
(connect, send, shutdown, open a UDP or ICMP flow, send a DNS query) into
non-blocking host sockets registered with the loop, and turns socket
readiness back into calls on the engines. It knows nothing of the device the
guest's frames cross; what it needs of the attachment is its pacing
(:class:`Pacing`: schedule or run one ``Stack.flush``, re-arm the timer, keep
busy polling), bound once at construction so a call costs no extra lookup.

* a readable host socket is read and flushed in its own callback: the guest
  is waiting for those bytes, so they do not wait for the loop's next turn;
* other work (UDP, error reports) schedules one flush (``schedule_flush``),
  which coalesces over the callbacks of one loop iteration; DNS answers need
  no flush: they go to the guest as they are read.

Errors on host sockets never escape into the loop: they are reported to the
engine that owns the socket (as a real socket would), after the current call
returns (``call_soon``), so an engine is never re-entered from its own call.
Work that the engine's call asks for but that must wait for it to return (a
loopback connect that finished inside ``connect()``; reading the host socket
when the guest half-closes) is queued in :attr:`HostSockets.deferred` and run
right after that call, within the same callback: the TAP device runs it
between two frames, ``Attachment.input_done`` after a batch. A guest's
``connect()`` waits for that SYN-ACK, and a host EOF read then lets our FIN
carry the ACK of the guest's FIN.

Out of file descriptors (EMFILE/ENFILE when a flow's host socket is made): the
new flow fails as a refused one would (TCP: RST to the guest; UDP: the datagram
is dropped; ping: "administratively prohibited"; DNS: the next upstream, then
SERVFAIL), flows already open are untouched, and new ones work again as soon
as fds are free. Each failure is counted (``host.out_of_fds``; other socket()
failures ``host.socket_failed``); a warning is logged at most once per
``SOCKET_WARNING_INTERVAL``, since a guest opening flows in a loop would
otherwise flood the log with one line per attempt.

A UDP flow's host socket asks for a receive queue of ``UDP_RCVBUF`` (1 MiB, so
~900 datagrams of 1400 bytes where ``net.core.rmem_max`` allows it, ~180 where it
is the common 212992; the default holds 92): it is the only queue between a host
sender and this process, and at 600 Mbit/s the default one is full within 2 ms,
less than one wait for a CPU on a busy machine. Datagrams lost there were most
of pyslirp's UDP download loss (``bench/run.py --only udp``: the host's
``RcvbufErrors``). The memory is the kernel's, taken only while we are behind,
and bounded by ``net.ipv4.udp_mem`` for all sockets together.

Host TCP sockets are watched for reading through one epoll set of our own
(:class:`TcpReaders`, a :class:`ReaderSet`), itself one reader of the loop: registering a socket
with it is one ``epoll_ctl`` and forgetting it another, where the loop's
``add_reader``/``remove_reader`` cost seven ``epoll_ctl``, an ``ioctl`` and a
poll handle per connection (uvloop; issue 14, measured with ``strace -c``).
Each wake-up of the set costs one ``epoll_wait(0)`` that the loop's own
dispatch of a per-socket reader would have replaced. Writers (a connect in
progress, a full send buffer) are rare and stay with the loop.

uvloop (libuv's ``uv_poll``) stops polling a descriptor for good when epoll
reports ``POLLERR`` (an ICMP error queued by ``IP_RECVERR``, or refused on a
connected socket) and does not call its reader then (uvloop's poll callback
treats the error as fatal to the handle), while it still counts the reader as
registered. So the UDP flows' host sockets are read through a :class:`ReaderSet`
of their own, as TCP's, where ``EPOLLERR`` is one more readiness for the
callback, which drains the error queue. (Registering the loop's reader again
after a wake-up that met an error, :func:`rearm_reader`, covered only errors
seen by a read: one that epoll reported first left the flow deaf, seen under a
UDP flood's ICMP errors, tests/e2e/test_floods_more.py. The ping and DNS
sockets, few and rarely refused, still use it.) Without either, a UDP flow that
met one ICMP error never delivered a datagram again, and a DNS upstream that was
down once was never heard from again.

Port forwarding (:mod:`pyslirp.runtime.hostfwd`) adds flows whose host socket
was accepted rather than connected; they get a :class:`TcpHandle` too and are
served by the same code from then on.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import logging
import select
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pyslirp.runtime.ifaddrs import Outbound
from pyslirp.stack.stack import Stack

log = logging.getLogger("pyslirp")

_HOST_READ_MAX = 256 * 1024
_UDP_READ_BATCH = 64
_UDP_MAX = 65536
#: SO_RCVBUF asked for a flow's host socket (the kernel doubles it and caps the request
#: at net.core.rmem_max): see udp_open.
UDP_RCVBUF = 1 << 20
#: Host datagrams read less than this apart (loop seconds: uvloop's clock ticks in
#: milliseconds) are a stream: they start no busy polling (see _udp_readable).
_UDP_STREAM_GAP = 0.002

# struct sock_extended_err (linux/errqueue.h)
_SOCK_EE = struct.Struct("=IBBBBII")
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
#: The (level, type) of the error-queue control message on an IPv4 and an IPv6 socket.
_RECVERR_CMSGS = ((socket.IPPROTO_IP, _IP_RECVERR),
                  (socket.IPPROTO_IPV6, _IPV6_RECVERR))
# <linux/udp.h>: UDP generic segmentation offload (send side), Linux 4.18.
_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_U16_NATIVE = struct.Struct("=H")
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)
_ICMPV6_ECHO_REQUEST = 128
_ICMPV6_ECHO_REPLY = 129
#: Seconds between two warnings that a host socket could not be made.
SOCKET_WARNING_INTERVAL = 60.0


def rearm_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[..., Any],
                 *args: Any) -> None:
    """Register ``callback`` as ``fd``'s reader anew, after a wake-up that may have been
    a ``POLLERR``: uvloop's poll handle is stopped then but still counts as
    registered, so adding the same reader again would change nothing (see the
    module docstring; Kludex/zuvloop#45 describes the same mechanism)."""
    loop.remove_reader(fd)
    loop.add_reader(fd, callback, *args)


class TcpHandle:
    """The runtime's side of one TCP flow (``flow.host_handle``): its host socket and
    which readiness callbacks are registered. Port forwarding creates these for
    accepted connections too (pyslirp.runtime.hostfwd)."""

    __slots__ = ("sock", "fd", "targets", "reading", "writing", "connecting", "closed")

    def __init__(self) -> None:
        #: A plain ``_socket.socket`` when we connected it (see _tcp_try_next), the
        #: accepted ``socket.socket`` for a forwarded connection.
        self.sock: _socket.socket | None = None
        self.fd = -1
        self.targets: list[tuple[str, int]] = []
        self.reading = False
        self.writing = False
        self.connecting = False
        self.closed = False


class ReaderSet:
    """Sockets being read, in one epoll set that is one reader of the loop.

    Level-triggered, as the loop's readers are: a socket stays ready until it is
    read dry. An ``EPOLLERR`` (an ICMP error queued for a datagram socket) reaches
    the callback like any readiness, where the loop's own readers stop for good at
    one (see the module docstring). The set is made on first use and closed by
    :meth:`close`.
    """

    #: Ready sockets taken per wake-up; more are reported at the next (level-triggered).
    MAX_EVENTS = 64

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_readable: Callable[..., None]) -> None:
        self.loop = loop
        self._on_readable = on_readable
        self._epoll: select.epoll | None = None
        #: fd -> the arguments of ``on_readable`` for every socket in the set.
        self.watched: dict[int, tuple[Any, ...]] = {}

    def watch(self, fd: int, *args: Any) -> None:
        ep = self._epoll
        if ep is None:
            ep = self._epoll = select.epoll()
            self.loop.add_reader(ep.fileno(), self._dispatch)
        try:
            ep.register(fd, select.EPOLLIN)
        except FileExistsError:
            # A closed socket's fd number, reused: the kernel dropped the old entry
            # only if nothing else held that file open; take the entry over.
            ep.modify(fd, select.EPOLLIN)
        self.watched[fd] = args

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` (call before closing it)."""
        if self.watched.pop(fd, None) is not None and self._epoll is not None:
            try:  # noqa: SIM105 - contextlib.suppress is three Python calls more, per socket
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _dispatch(self) -> None:
        ep = self._epoll
        if ep is None:
            return
        watched = self.watched
        for fd, _events in ep.poll(0, self.MAX_EVENTS):
            entry = watched.get(fd)
            # (A callback may have forgotten a socket whose event is still in this list.)
            if entry is not None:
                self._on_readable(*entry)

    def close(self) -> None:
        ep, self._epoll = self._epoll, None
        if ep is not None:
            self.loop.remove_reader(ep.fileno())
            ep.close()
        self.watched.clear()


class TcpReaders(ReaderSet):
    """The host TCP sockets being read: each watched with its (flow, handle)."""

    def add(self, flow: Any, handle: TcpHandle) -> None:
        self.watch(handle.fd, flow, handle)

    def remove(self, handle: TcpHandle) -> None:
        """Stop watching ``handle``'s socket (call before closing it)."""
        self.unwatch(handle.fd)


class Pacing(Protocol):
    """What the host side needs of its attachment (pyslirp.runtime.attachment.Attachment)."""

    busy_poll: float

    def schedule_flush(self) -> None:
        """One ``Stack.flush`` and timer re-arm after this loop iteration's callbacks."""

    def schedule_quiet_flush(self) -> None:
        """The same, but this work does not keep the loop busy polling."""

    def flush_now(self, now: float) -> None:
        """``Stack.flush`` now, then re-arm the timer (and keep busy polling)."""

    def arm_timer(self) -> None:
        """Re-arm the loop timer at the stack's next deadline."""

    def keep_polling(self, now: float) -> None:
        """Poll instead of sleeping for ``busy_poll`` seconds after this work."""


class HostSockets:
    """The host sockets of one attachment's flows: its stack's HostPort."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pacing: Pacing) -> None:
        self.loop = loop
        #: Set by the attachment once the stack (which needs us first) exists.
        self.stack: Stack
        #: True once the attachment is closed: no more flushes from socket callbacks.
        self.closed = False
        # Bound once: each is called per host read or per flush request, and a bound
        # method in the instance costs one call, as a method of our own would.
        self._schedule_flush = pacing.schedule_flush
        self._schedule_quiet_flush = pacing.schedule_quiet_flush
        self._flush_now = pacing.flush_now
        self._arm_timer = pacing.arm_timer
        self._keep_polling = pacing.keep_polling
        self._busy_poll = pacing.busy_poll
        #: Host-socket work the engine's current call asked for, run once it has
        #: returned (see _after_engine_call). Emptied in place, never replaced.
        self.deferred: list[tuple[Callable[[Any, TcpHandle], None], Any, TcpHandle]] = []
        #: ``--outbound-addr[6]``: host sockets toward the outside bind here first.
        self.outbound = Outbound()
        #: The host TCP sockets being read (see TcpReaders).
        self.tcp_readers = TcpReaders(loop, self._tcp_readable)
        self._watch = self.tcp_readers.add
        self._unwatch = self.tcp_readers.remove
        #: The UDP flows' host sockets being read (see ReaderSet).
        self.udp_readers = ReaderSet(loop, self._udp_readable)
        #: The DNS forwarder's sockets, one per upstream (see dns_send).
        self._dns_sockets: dict[tuple[str, int], socket.socket] = {}
        #: Loop time before which no further "cannot make a host socket" warning is logged.
        self._socket_warning_until = -1.0

    def close(self) -> None:
        """The attachment is closed (after ``Stack.close_all`` closed every flow's
        socket): no more flushes from socket callbacks, and the epoll set goes."""
        self.closed = True
        self.tcp_readers.close()
        self.udp_readers.close()

    # ---- host sockets that cannot be had -------------------------------------------
    def _socket_failed(self, exc: OSError, kind: str) -> None:
        """socket() failed for a new ``kind`` flow: count it; warn now and then, not per flow."""
        out_of_fds = exc.errno in _OUT_OF_FDS
        self.stack.link.count("host.out_of_fds" if out_of_fds else "host.socket_failed")
        now = self.loop.time()
        if now < self._socket_warning_until:
            return
        self._socket_warning_until = now + SOCKET_WARNING_INTERVAL
        if out_of_fds:
            log.warning("out of file descriptors (%s): new %s flows are refused until some "
                        "close (counted as host.out_of_fds; not warned again for %.0f s)",
                        exc.strerror, kind, SOCKET_WARNING_INTERVAL)
        else:
            log.warning("cannot open a %s socket: %s (counted as host.socket_failed; not "
                        "warned again for %.0f s)", kind, exc.strerror, SOCKET_WARNING_INTERVAL)

    # ---- HostPort: TCP ------------------------------------------------------------
    def tcp_connect(self, flow: Any, targets: list[tuple[str, int]]) -> None:
        handle = TcpHandle()
        handle.targets = list(targets)
        flow.host_handle = handle
        self._tcp_try_next(flow, handle, errno.ENETUNREACH)

    def _tcp_try_next(self, flow: Any, handle: TcpHandle, last_error: int) -> None:
        while handle.targets:
            host, port = handle.targets.pop(0)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                # Non-blocking from the start: one syscall fewer than setblocking(). The
                # C socket type itself: socket.socket's __init__ and close() are Python
                # frames around the same syscalls, and nothing here needs its extras.
                sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:
                self._socket_failed(exc, "TCP")
                last_error = exc.errno or errno.EMFILE
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.outbound:
                try:
                    self.outbound.bind(sock)
                except OSError as exc:
                    sock.close()
                    last_error = exc.errno or errno.EADDRNOTAVAIL
                    continue
            err = sock.connect_ex(sockaddr(host, port) if "%" in host else (host, port))
            if err and err != errno.EINPROGRESS:
                sock.close()
                last_error = err
                continue
            handle.sock = sock
            handle.fd = sock.fileno()
            if not err:
                connected = True
            else:
                try:  # _connected(sock), inline: once per connection
                    sock.getpeername()
                    connected = True
                except OSError:
                    # A loopback port nobody listens on refuses inside connect() too:
                    # its error is already there, no epoll round trip needed (a SYN
                    # flood to closed ports gets 2,000 such connects a second).
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        sock.close()
                        handle.sock = None
                        handle.fd = -1
                        last_error = err
                        continue
                    connected = False
            if connected:
                # Loopback connects finish inside connect(): skip the epoll round trip,
                # and answer the SYN as soon as the engine's call returns rather than
                # a loop iteration later, behind other flows' work: the guest's
                # connect() is waiting for that SYN-ACK.
                self._after_engine_call(self._tcp_established, flow, handle)
                return
            handle.connecting = True
            self.loop.add_writer(handle.fd, self._tcp_connect_done, flow, handle)
            return
        self.loop.call_soon(self._tcp_report_connect_failed, flow, handle, last_error)

    def _after_engine_call(self, callback: Callable[[Any, TcpHandle], None], flow: Any,
                           handle: TcpHandle) -> None:
        """Run ``callback(flow, handle)`` once the engine call in progress has returned.

        The engine is never re-entered from its own call. Guest input runs these after
        each frame (the TAP device) or batch (``Attachment.input_done``); anything else
        gets them in the next loop iteration.
        """
        if not self.deferred:
            self.loop.call_soon(self._run_deferred_and_flush)
        self.deferred.append((callback, flow, handle))

    def run_deferred(self) -> None:
        """Run the work queued by :meth:`_after_engine_call`; the caller flushes the stack.

        The list is emptied in place: the attachment and its device hold it, to test
        it between frames without a call.
        """
        pending = self.deferred
        if pending:
            work = pending[:]
            pending.clear()
            for callback, flow, handle in work:
                callback(flow, handle)

    def _run_deferred_and_flush(self) -> None:
        if self.deferred:
            self.run_deferred()
            self._schedule_flush()

    def _tcp_report_connect_failed(self, flow: Any, handle: TcpHandle, err: int) -> None:
        if handle.closed:
            return
        handle.closed = True
        flow.host_connect_failed(err, self.loop.time())
        self._schedule_flush()

    def _tcp_connect_done(self, flow: Any, handle: TcpHandle) -> None:
        sock = handle.sock
        assert sock is not None
        self.loop.remove_writer(handle.fd)
        handle.connecting = False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            handle.sock = None
            handle.fd = -1
            if handle.targets:
                self._tcp_try_next(flow, handle, err)
            else:
                self._tcp_report_connect_failed(flow, handle, err)
            return
        self._tcp_established(flow, handle)
        self._schedule_flush()

    def _tcp_established(self, flow: Any, handle: TcpHandle) -> None:
        if handle.closed:
            return
        handle.reading = True
        self._watch(flow, handle)
        flow.host_connected(self.loop.time())

    def _tcp_readable(self, flow: Any, handle: TcpHandle) -> None:
        now = self.loop.time()
        self._tcp_read(flow, handle, now)
        # Flush now, not at the end of the loop iteration: the guest is waiting for
        # these bytes (a request/response exchange), and per-flow frames gain nothing
        # from waiting for other callbacks.
        if not self.closed:
            self._flush_now(now)

    def _tcp_read_now(self, flow: Any, handle: TcpHandle) -> None:
        if handle.reading and not handle.closed:
            self._tcp_read(flow, handle, self.loop.time())

    def _tcp_read(self, flow: Any, handle: TcpHandle, now: float) -> None:
        sock = handle.sock
        while not handle.closed and sock is not None:
            budget = flow.host_read_budget()
            if budget <= 0:
                self._tcp_stop_reading(handle)
                break
            try:
                data = sock.recv(min(budget, _HOST_READ_MAX))
            except BlockingIOError:
                break
            except OSError as exc:
                self._tcp_stop_reading(handle)
                flow.host_error(exc.errno or errno.ECONNRESET, now)
                break
            if not data:
                self._tcp_stop_reading(handle)
                flow.host_eof(now)
                break
            flow.host_data(data, now)
            if len(data) < min(budget, _HOST_READ_MAX):
                break  # the socket is drained for now; don't pay an EAGAIN syscall

    def _tcp_stop_reading(self, handle: TcpHandle) -> None:
        if handle.reading:
            handle.reading = False
            self._unwatch(handle)

    def tcp_write(self, flow: Any, data: Any) -> int:
        handle: TcpHandle = flow.host_handle
        sock = handle.sock
        if sock is None or handle.closed:
            return 0
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.loop.call_soon(self._tcp_report_error, flow, handle, exc.errno or errno.EPIPE)
            return 0
        if sent < len(data) and not handle.writing:
            handle.writing = True
            self.loop.add_writer(handle.fd, self._tcp_writable, flow, handle)
        return sent

    def _tcp_report_error(self, flow: Any, handle: TcpHandle, err: int) -> None:
        if not handle.closed:
            flow.host_error(err, self.loop.time())
            self._schedule_flush()

    def _tcp_writable(self, flow: Any, handle: TcpHandle) -> None:
        if handle.writing:
            handle.writing = False
            self.loop.remove_writer(handle.fd)
        if not handle.closed:
            flow.host_writable(self.loop.time())
            self._schedule_flush()

    def tcp_shutdown_write(self, flow: Any) -> None:
        handle: TcpHandle = flow.host_handle
        if handle.sock is not None and not handle.closed:
            try:  # noqa: SIM105 - contextlib.suppress is three Python calls more, per connection
                handle.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            # The guest closed its side. A request/response peer has usually closed
            # too and its EOF is waiting unread: read it before the guest's FIN is
            # acknowledged, so our FIN carries that ACK (one frame, not two, and no
            # loop round trip). When nothing is there, it costs one recv().
            self._after_engine_call(self._tcp_read_now, flow, handle)

    def tcp_pause_reading(self, flow: Any) -> None:
        self._tcp_stop_reading(flow.host_handle)

    def tcp_resume_reading(self, flow: Any) -> None:
        handle: TcpHandle = flow.host_handle
        if handle is None or handle.closed or handle.sock is None or handle.connecting:
            return
        if not handle.reading:
            handle.reading = True
            self._watch(flow, handle)

    def tcp_close(self, flow: Any, reset: bool) -> None:
        handle: TcpHandle | None = getattr(flow, "host_handle", None)
        if handle is None or handle.closed:
            return
        handle.closed = True
        sock = handle.sock
        if sock is None:
            return
        if handle.reading:
            self._unwatch(handle)
        if handle.writing or handle.connecting:
            self.loop.remove_writer(handle.fd)
        handle.reading = handle.writing = handle.connecting = False
        if reset:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        handle.sock = None

    # ---- HostPort: UDP ------------------------------------------------------------
    def udp_open(self, flow: Any) -> bool:
        v6 = getattr(flow, "v6", False)
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            self._socket_failed(exc, "UDP")
            return False
        sock.setblocking(False)
        _widen_receive_queue(sock)
        # ICMP(v6) errors reach the guest as ICMP(v6) errors (pyslirp/stack/udp.py): a
        # guest's UDP client to a closed port is refused at once, not left to time out.
        _ask_for_errors(sock, v6)
        if self.outbound:
            try:
                self.outbound.bind(sock)
            except OSError as exc:
                sock.close()
                log.warning("cannot bind a UDP socket to the outbound address: %s", exc.strerror)
                return False
        flow.host_handle = sock
        self.udp_readers.watch(sock.fileno(), flow, sock, [-1.0])
        return True

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Any, segment: int = 0) -> None:
        sock: socket.socket | None = flow.host_handle
        if sock is None:
            return
        if segment:
            self._udp_send_segments(sock, dst, data, segment)
            return
        try:
            sock.sendto(data, dst)
        except BlockingIOError:
            self.stack.link.count("drop.udp.host_send")
        except OSError:
            # An ICMP error about an earlier datagram (to this or another peer) was
            # pending and this send reported it instead of sending; the error itself
            # stays queued for udp_read_errors (IP_RECVERR). Send again, once.
            try:
                sock.sendto(data, dst)
            except OSError:
                self.stack.link.count("drop.udp.host_send")

    def _udp_send_segments(self, sock: socket.socket, dst: tuple[str, int],
                           data: list[Any], segment: int) -> None:
        """Datagrams of ``segment`` bytes (the last may be shorter) laid end to end in
        the buffers ``data``: one sendmsg with ``UDP_SEGMENT``, so the kernel cuts
        them exactly where the guest's did. Where it refuses (no UDP GSO, a path MTU
        below the segment, a pending ICMP error reported instead), one sendto each."""
        try:
            sock.sendmsg(data, [(_SOL_UDP, _UDP_SEGMENT, _U16_NATIVE.pack(segment))], 0, dst)
            return
        except OSError:
            pass
        whole = memoryview(b"".join(data))
        count = self.stack.link.count
        for start in range(0, len(whole), segment):
            try:
                sock.sendto(whole[start:start + segment], dst)
            except OSError:
                count("drop.udp.host_send")

    def _udp_readable(self, flow: Any, sock: socket.socket, last_read: list[float]) -> None:
        """``last_read``: the loop time of this socket's previous read, in a cell."""
        now = self.loop.time()
        previous, last_read[0] = last_read[0], now
        udp = self.stack.udp
        # Back-to-back datagrams from one peer, each the first's size but the last,
        # go to the engine together (one USO frame to the guest where the TAP takes
        # it); the first of a run is held until the next read says whether one
        # follows, so a lone datagram costs what it did.
        run: list[Any] = []
        run_from: Any = None
        read = 0
        for read in range(_UDP_READ_BATCH):  # noqa: B007 - used after the loop
            try:
                data, (src_ip, src_port, *_rest) = sock.recvfrom(_UDP_MAX)
            except BlockingIOError:
                if not read:  # woken with nothing to read: a POLLERR for the error queue
                    self.udp_read_errors(flow, sock, now)
                break
            except OSError:
                if run:
                    self._udp_deliver(udp, flow, run_from, run, now)
                    run = []
                self.udp_read_errors(flow, sock, now)
                continue
            if run:
                if (src_ip, src_port) == run_from and len(data) <= len(run[0]) == len(run[-1]):
                    run.append(data)
                    continue
                self._udp_deliver(udp, flow, run_from, run, now)
            run = [data]
            run_from = (src_ip, src_port)
        if run:
            self._udp_deliver(udp, flow, run_from, run, now)
        if read > 1 or now - previous < _UDP_STREAM_GAP:
            # Several datagrams were waiting, or this one came right after the last:
            # a stream, whose next datagram wakes the loop anyway; polling for it took
            # CPU from both ends (schedule_quiet_flush).
            self._schedule_quiet_flush()
        else:
            self._schedule_flush()

    @staticmethod
    def _udp_deliver(udp: Any, flow: Any, peer: tuple[str, int], run: list[Any],
                     now: float) -> None:
        if len(run) == 1:
            udp.host_datagram(flow, peer[0], peer[1], run[0], now)
        else:
            udp.host_datagrams(flow, peer[0], peer[1], run, now)

    def udp_read_errors(self, flow: Any, sock: socket.socket, now: float) -> None:
        """Drain the error queue (IP[V6]_RECVERR) and report ICMP errors to the engine."""
        for _data, addr, icmp_type, icmp_code, info in _queued_icmp_errors(sock):
            if addr:
                self.stack.udp.host_error(flow, (addr[0], addr[1]), icmp_type, icmp_code, now,
                                          info)

    def udp_close(self, flow: Any) -> None:
        sock: socket.socket | None = getattr(flow, "host_handle", None)
        if sock is None:
            return
        flow.host_handle = None
        self.udp_readers.unwatch(sock.fileno())
        sock.close()

    # ---- HostPort: ICMP echo --------------------------------------------------------
    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Any) -> bool:
        v6 = getattr(flow, "v6", False)
        sock: socket.socket | None = getattr(flow, "host_handle", None)
        if sock is None:
            try:
                # net.ipv4.ping_group_range allows ICMPv6 datagram sockets as well.
                sock = (socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6)
                        if v6 else
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._socket_failed(exc, "ICMP")
                return False  # or net.ipv4.ping_group_range does not include us
            sock.setblocking(False)
            _ask_for_errors(sock, v6)
            if self.outbound:
                try:
                    self.outbound.bind(sock)
                except OSError:
                    sock.close()
                    return False
            flow.host_handle = sock
            self.loop.add_reader(sock.fileno(), self._icmp_readable, flow, sock)
        # The kernel rewrites the identifier to the socket's own and back on replies,
        # and fills in the checksum.
        message = struct.pack("!BBHHH", _ICMPV6_ECHO_REQUEST if v6 else 8, 0, 0, ident,
                              seq) + bytes(payload)
        try:
            sock.sendto(message, (dst, 0))
        except OSError:
            return False
        return True

    def _icmp_readable(self, flow: Any, sock: socket.socket) -> None:
        now = self.loop.time()
        drained = errored = False  # rearm_reader unless drained without an error
        for read in range(_UDP_READ_BATCH):
            try:
                data = sock.recv(_UDP_MAX)
            except BlockingIOError:
                drained = True
                if not read:  # woken with nothing to read: a POLLERR for the error queue
                    self._icmp_read_errors(flow, sock, now)
                    errored = True
                break
            except OSError:
                errored = True
                self._icmp_read_errors(flow, sock, now)
                continue
            if len(data) >= 8 and data[0] == (_ICMPV6_ECHO_REPLY if flow.v6 else 0):
                seq = int.from_bytes(data[6:8], "big")
                self.stack.icmp.host_echo_reply(flow, seq, data[8:], now)
        if (errored or not drained) and flow.host_handle is sock:
            rearm_reader(self.loop, sock.fileno(), self._icmp_readable, flow, sock)
        self._schedule_flush()

    def _icmp_read_errors(self, flow: Any, sock: socket.socket, now: float) -> None:
        """An echo of ours met an ICMP error (e.g. host unreachable): tell the guest."""
        for data, _addr, icmp_type, icmp_code, info in _queued_icmp_errors(sock):
            if len(data) >= 8:
                seq = int.from_bytes(data[6:8], "big")
                self.stack.icmp.host_echo_error(flow, seq, icmp_type, icmp_code, now, info)

    def icmp_close(self, flow: Any) -> None:
        sock: socket.socket | None = getattr(flow, "host_handle", None)
        if sock is not None:
            flow.host_handle = None
            self.loop.remove_reader(sock.fileno())
            sock.close()

    # ---- HostPort: DNS --------------------------------------------------------------
    # One connected UDP socket per upstream, shared by every query (the forwarder
    # gives each attempt an ID of its own); see pyslirp/stack/dns.py.
    def dns_send(self, query: Any, upstream: tuple[str, int], data: Any) -> None:
        sock = self._dns_sockets.get(upstream)
        if sock is None:
            sock = self._dns_open(upstream)
            if sock is None:
                self.loop.call_soon(self._dns_failed, query, upstream)
                return
        for _ in range(2):
            try:
                sock.send(data)
                return
            except ConnectionRefusedError:
                # An ICMP error about an earlier datagram was pending on the socket and
                # this send reported it instead of sending (the error queue still says
                # which datagram it was about): send again. The error's POLLERR may
                # have stopped the reader behind an answer it read first.
                rearm_reader(self.loop, sock.fileno(), self._dns_readable, upstream, sock)
                continue
            except BlockingIOError:
                self.stack.link.count("dns.drop.send_full")  # the attempt times out
                return
            except OSError:
                break
        self.loop.call_soon(self._dns_failed, query, upstream)

    def _dns_open(self, upstream: tuple[str, int]) -> socket.socket | None:
        host, port = upstream
        v6 = ":" in host
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            self._socket_failed(exc, "DNS")
            return None
        try:
            sock.setblocking(False)
            # Errors arrive with the start of the datagram they are about (its DNS ID).
            _ask_for_errors(sock, v6)
            if self.outbound:
                self.outbound.bind(sock)
            sock.connect(sockaddr(host, port))
        except OSError:
            sock.close()
            return None
        self._dns_sockets[upstream] = sock
        self.loop.add_reader(sock.fileno(), self._dns_readable, upstream, sock)
        return sock

    def _dns_failed(self, query: Any, upstream: tuple[str, int]) -> None:
        self.stack.dns.upstream_failed(query, self.loop.time(), upstream)
        self._schedule_flush()

    def _dns_readable(self, upstream: tuple[str, int], sock: socket.socket) -> None:
        now = self.loop.time()
        dns = self.stack.dns
        sockets = self._dns_sockets
        errored = False
        for read in range(_UDP_READ_BATCH):
            try:
                data = sock.recv(_UDP_MAX)
            except BlockingIOError:
                if not read:  # woken with nothing to read: a POLLERR for the error queue
                    self._dns_read_errors(upstream, sock, now)
                    errored = True
                break
            except OSError:
                self._dns_read_errors(upstream, sock, now)
                errored = True
            else:
                dns.upstream_datagram(upstream, data, now)
                if not dns.inflight.get(upstream):
                    break  # nothing more is expected: spare the read that gets EAGAIN
            if sockets.get(upstream) is not sock:
                break  # the forwarder released the upstream meanwhile
        else:
            errored = True  # the batch limit: an error may wait behind the answers
        if errored and sockets.get(upstream) is sock:
            rearm_reader(self.loop, sock.fileno(), self._dns_readable, upstream, sock)
        # Answers went to the guest already and no TCP flow was touched: no
        # Stack.flush is needed, only the timer (a failover sets a deadline).
        self._arm_timer()
        if self._busy_poll:
            self._keep_polling(now)  # the guest's next query follows the answer

    def _dns_read_errors(self, upstream: tuple[str, int], sock: socket.socket,
                         now: float) -> None:
        """Fail the attempts that the socket's queued errors are about (IP_RECVERR
        returns the start of each datagram that met an error), or, if none is
        queued, every attempt waiting on this upstream."""
        dns = self.stack.dns
        named = False
        while True:
            try:
                data, _anc, _flags, _addr = sock.recvmsg(
                    2, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except OSError:
                break
            if len(data) == 2:
                named = True
                dns.upstream_error(upstream, now, data[0] << 8 | data[1])
        if not named:
            dns.upstream_error(upstream, now, None)

    def dns_cancel(self, query: Any) -> None:
        pass  # nothing is held per query

    def dns_release(self, upstream: tuple[str, int]) -> None:
        sock = self._dns_sockets.pop(upstream, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            sock.close()


def _widen_receive_queue(sock: socket.socket) -> None:
    """Ask for ``UDP_RCVBUF`` of receive queue (see the module docstring); where the
    kernel refuses, the default queue serves."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)


def _ask_for_errors(sock: socket.socket, v6: bool) -> None:
    """Queue the ICMP (IPv4) or ICMPv6 errors about what ``sock`` sends (IP[V6]_RECVERR)."""
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)


def _queued_icmp_errors(sock: socket.socket) -> Iterator[tuple[bytes, Any, int, int, int]]:
    """Drain an IP[V6]_RECVERR socket's error queue: for each ICMP or ICMPv6 error, the
    start of the datagram it was about, that datagram's destination, the type and code
    (ICMPv6 ones on an IPv6 socket), and ``ee_info`` (the MTU of a packet too big)."""
    while True:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(
                512, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except OSError:
            return
        for level, kind, payload in ancdata:
            if (level, kind) not in _RECVERR_CMSGS or len(payload) < _SOCK_EE.size:
                continue
            _errno, origin, icmp_type, icmp_code, _pad, info, _data = _SOCK_EE.unpack_from(payload)
            if origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
                yield data, addr, icmp_type, icmp_code, info


def sockaddr(host: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address to connect to: an IPv6 address with a zone (``fe80::1%eth0``, an
    upstream from resolv.conf or ``--dns-upstream``) as a 4-tuple with its scope id.

    Python's ``(host, port)`` form resolves the zone and then sets the scope id from
    the tuple (0), so the kernel refuses a link-local destination (EINVAL).
    """
    if "%" not in host:
        return (host, port)
    info = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                              socket.AI_NUMERICHOST)
    addr: tuple[Any, ...] = info[0][4]
    return (str(addr[0]), port, int(addr[2]), int(addr[3]))
