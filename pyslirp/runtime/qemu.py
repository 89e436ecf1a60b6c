"""QEMU back ends: serve a VM's NIC over ``-netdev stream`` or ``-netdev dgram``.

Theory of operation
-------------------
A namespace's link is a TAP fd; a VM's link is a socket QEMU connects to, as
with passt. Everything above the link (the :class:`~pyslirp.stack.stack.Stack`,
host sockets, DNS, port forwarding, the API socket, pcap) is the same, so the
two classes here are devices (:class:`~pyslirp.runtime.device.Device`) that an
:class:`~pyslirp.runtime.attachment.Attachment` composes like a TAP: they only
read and write frames. Frames are plain Ethernet (no virtio-net header, no
GSO): QEMU's socket back ends carry what the guest's NIC put on the wire, so
both are ``plain_frames`` devices (the attachment refuses ``config.vnet_hdr``
or ``config.offload``) and the TCP engine segments to the MSS itself.

The device's fd is the *listening* socket (stream) or the bound datagram
socket (dgram); the device registers a duplicate of it with the loop, so the
caller closes its own.

``-netdev stream`` (QEMU >= 7.2, net/stream.c): each frame is preceded by
its length as a 4-byte big-endian integer. We accept on a Unix stream socket
(QEMU runs with ``server=off,addr.type=unix,addr.path=SOCKET``), read in
large chunks and cut each frame out as a bytes object of its own, as a TAP
read gives it: the stack may keep a view of a frame (a fragment waiting for
its siblings) and must not pin a whole 256 KiB chunk by doing so, and
copying a frame of at most MTU + 14 bytes costs far less than the stack's
work on it. A length above
:data:`MAX_FRAME` (65,536 + 4,096, QEMU's ``NET_BUFSIZE``) means the byte
stream is not what we think it is: we log it and drop the connection (QEMU
reconnects if told to with ``reconnect=``). A frame shorter than an Ethernet
header is counted and skipped; the framing is still intact.

Who may connect: the socket file is created 0600 (:func:`pyslirp.runtime.unixsock.bind_unix` sets
the mode before ``bind``, so it is never wider, whatever the umask), so
only its owner and root can. One QEMU at a time: a new connection from the
same user and group as the current one (``SO_PEERCRED``) replaces it, since
a VM that reconnects (QEMU restarted, ``reconnect=`` after a hiccup) is the
live peer and a half-dead old connection must not lock it out; one from
anybody else while a VM is connected is refused, closed and logged (root
can connect to any socket file; it must still not cut a VM off). Frames to the
guest while nobody is connected are dropped and counted
(``drop.tx.no_peer``), as a NIC with its cable pulled would.

Writing: a stream has no frame boundaries the kernel must keep, so frames
are batched: each is copied once with its length prefix into a queue (its
parts may be reused by the stack once we return), and one ``sendmsg`` per
loop iteration sends the whole queue (measured: 6.4 us per 1514-byte frame
with a ``sendmsg`` each, 2.2 us copied and sent 64 at a time). A stream
socket may take only part of a message when its buffer is full; a cut frame
would desynchronise QEMU's reader for good, so the unsent rest stays queued
until the socket is writable again, up to :data:`MAX_BACKLOG` bytes, beyond
which whole frames are dropped and counted (``drop.tx.backlog``): the
guest's TCP retransmits, exactly as for a TAP whose queue is full.

``-netdev dgram`` (QEMU >= 7.2, net/dgram.c): one frame per datagram on a
Unix datagram socket. QEMU sends from its ``local`` address to ours
(``remote``); we answer to the address the last datagram came from, so
QEMU must bind a ``local.path``; the socket file is 0600 as for a stream,
so only its owner and root can send to it. Until QEMU has sent something, frames to it
are dropped and counted (``drop.tx.no_peer``). A datagram longer than
:data:`MAX_FRAME` is dropped and counted (``drop.rx.too_big``), never cut.

IPv6 (``-6``, ``--cidr6``) is the stack's, as for a namespace: the VM's kernel
configures itself from the router advertisements (SLAAC in fd00::/64, default
route via our link-local address), as it would on QEMU's own user networking.

Not done: inet/vsock/fd addresses (only Unix sockets), vhost-user, the
virtio-net header (QEMU's socket back ends never carry one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

from pyslirp.runtime import framefilter, unixsock
from pyslirp.runtime.device import Device, DeviceOwner
from pyslirp.runtime.spec import ServeSpec
from pyslirp.runtime.unixsock import peer_credentials

log = logging.getLogger("pyslirp")

#: QEMU's NET_BUFSIZE: the largest frame its socket back ends send or accept.
MAX_FRAME = 65536 + 4096
#: Bytes queued for a slow QEMU before frames are dropped.
MAX_BACKLOG = 4 * 1024 * 1024
_ETH_HEADER = 14
_LENGTH = struct.Struct("!I")
_READ_SIZE = 256 * 1024
_ACCEPT_BACKLOG = 4
_DGRAM_BATCH = 128
#: Frames per sendmsg (Linux's IOV_MAX is 1024).
_IOV_BATCH = 512


def bind_unix(path: str, kind: int) -> socket.socket:
    """QEMU's socket at ``path`` (stream or datagram), owner-only: :func:`unixsock.bind_unix`."""
    return unixsock.bind_unix(path, kind, backlog=_ACCEPT_BACKLOG)


def _peer_ids(conn: socket.socket) -> tuple[int, int] | None:
    """The (uid, gid) of the process at the other end of ``conn``, if the kernel says."""
    try:
        _pid, uid, gid = peer_credentials(conn)
    except OSError:
        return None
    return uid, gid


def _remove_socket_file(path: str, ino: int, dir_fd: int | None = None) -> None:
    """Remove ``path`` if it is still the socket we bound (not a successor's).

    ``dir_fd`` (an fd of its directory) still reaches it after
    ``--enable-sandbox`` has pivoted the root away.
    """
    name = path if dir_fd is None else os.path.basename(path)
    with contextlib.suppress(OSError):
        if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino == ino:
            os.unlink(name, dir_fd=dir_fd)


class QemuStreamDevice(Device):
    """The guest link over QEMU's ``-netdev stream`` (length-prefixed frames on a stream).

    ``fd`` is the listening Unix socket; it stays the caller's (we use a duplicate).
    """

    plain_frames = True

    def __init__(self, fd: int, name: str = "qemu") -> None:
        super().__init__(fd, name)
        self._owner: DeviceOwner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._conn_fd = -1
        #: (uid, gid) of the connected QEMU (SO_PEERCRED); only they may reconnect.
        self._peer: tuple[int, int] | None = None
        self._partial = b""
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._writing = False
        self._send_scheduled = False
        self.connections = 0
        #: Connections turned away because another user's QEMU was connected.
        self.refused = 0

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def start(self, owner: DeviceOwner) -> None:
        self._owner = owner
        self._loop = owner.loop
        self._listener = socket.socket(fileno=os.dup(self.fd))
        self._listener.setblocking(False)
        owner.loop.add_reader(self._listener.fileno(), self._on_listener_readable)

    # ---- accepting -----------------------------------------------------------------
    def _on_listener_readable(self) -> None:
        """Take the newest connection."""
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                conn, _addr = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE and friends: leave the connection in the backlog, try next time.
                log.warning("%s: cannot accept a QEMU connection: %s", self.name, exc.strerror)
                return
            peer = _peer_ids(conn)
            if self._conn is not None:
                if peer != self._peer:
                    self._refuse(conn, peer)
                    continue
                log.info("%s: QEMU connected again; dropping the previous connection",
                         self.name)
                self._drop_connection()
            self._peer = peer
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
            self._conn = conn
            self._conn_fd = conn.fileno()
            self.connections += 1
            self._loop.add_reader(self._conn_fd, self._on_conn_readable)
            log.info("%s: QEMU connected", self.name)

    def _refuse(self, conn: socket.socket, peer: tuple[int, int] | None) -> None:
        """Turn away a connection from another user than the connected VM's."""
        self.refused += 1
        who = "unknown credentials" if peer is None else f"uid {peer[0]} gid {peer[1]}"
        owner = "unknown credentials" if self._peer is None \
            else f"uid {self._peer[0]} gid {self._peer[1]}"
        log.warning("%s: refused a connection from %s: the VM's link is connected from %s",
                    self.name, who, owner)
        conn.close()

    def _drop_connection(self) -> None:
        conn = self._conn
        if conn is None or self._loop is None:
            return
        self._peer = None
        self._loop.remove_reader(self._conn_fd)
        if self._writing:
            self._loop.remove_writer(self._conn_fd)
            self._writing = False
        conn.close()
        self._conn = None
        self._conn_fd = -1
        self._partial = b""
        self._out.clear()
        self._out_bytes = 0

    # ---- frames from QEMU ----------------------------------------------------------
    def _on_conn_readable(self) -> None:
        conn = self._conn
        owner = self._owner
        if conn is None or owner is None:
            return
        try:
            chunk = conn.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: reading from QEMU failed: %s; waiting for it to reconnect",
                        self.name, exc.strerror)
            self._drop_connection()
            return
        if not chunk:
            log.info("%s: QEMU disconnected", self.name)
            self._drop_connection()
            return
        data = self._partial + chunk if self._partial else chunk
        now = owner.loop.time()
        end = len(data)
        pos = 0
        unpack = _LENGTH.unpack_from
        receive = owner.receive
        while end - pos >= 4 and self._conn is conn:
            (length,) = unpack(data, pos)
            if length > MAX_FRAME:
                log.error("%s: QEMU stream out of sync: a frame of %d bytes announced "
                          "(at most %d); dropping the connection", self.name, length, MAX_FRAME)
                owner.count("drop.rx.bad_length")
                self._drop_connection()
                owner.input_done(now)
                return
            if end - pos - 4 < length:
                break
            pos += 4
            if length < _ETH_HEADER:
                owner.count("drop.rx.runt")
            else:
                # A bytes object of its own: the stack may keep a view of it.
                receive(memoryview(data[pos:pos + length]), now)
            pos += length
        if self._conn is conn:  # not dropped by a failed write meanwhile
            self._partial = data[pos:] if pos < end else b""
        owner.input_done(now)

    # ---- frames to QEMU ------------------------------------------------------------
    def write_frame(self, parts: Sequence[Any]) -> bool:
        owner = self._owner
        if self._conn is None or owner is None:
            if owner is not None:
                owner.count("drop.tx.no_peer")
            return False
        size = 0
        for part in parts:
            size += len(part)
        if size > MAX_FRAME:
            owner.count("drop.tx.too_big")
            return False
        if self._out_bytes + size + 4 > MAX_BACKLOG:
            owner.count("drop.tx.backlog")
            return False
        # One copy now (the parts may be reused once we return), one sendmsg per batch later.
        self._out.append(b"".join((_LENGTH.pack(size), *parts)))
        self._out_bytes += size + 4
        if not self._send_scheduled and not self._writing:
            self._send_scheduled = True
            owner.loop.call_soon(self._send_out)
        return True

    def _send_out(self) -> None:
        """Send what is queued, as far as the socket takes it; wait for writability if not all."""
        self._send_scheduled = False
        conn = self._conn
        out = self._out
        while conn is not None and out:
            batch = list(itertools.islice(out, _IOV_BATCH))
            total = sum(map(len, batch))
            try:
                sent = conn.sendmsg(batch)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                log.info("%s: writing to QEMU failed: %s; waiting for it to reconnect",
                         self.name, exc.strerror)
                self._drop_connection()
                return
            self._out_bytes -= sent
            left = sent
            while left:
                head = out[0]
                if left < len(head):
                    # Never drop the rest of a frame: QEMU would read garbage lengths.
                    out[0] = head[left:]
                    break
                left -= len(head)
                out.popleft()
            if sent < total:
                break  # the socket is full: wait until it is writable
        if self._loop is None:
            return
        if out and conn is not None and not self._writing:
            self._writing = True
            self._loop.add_writer(self._conn_fd, self._send_out)
        elif not out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._conn_fd)

    # ---- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        if self._loop is None:
            return
        try:
            self._send_out()  # the RSTs close_all just queued, as far as QEMU takes them
        finally:
            self._drop_connection()
            if self._listener is not None:
                self._loop.remove_reader(self._listener.fileno())
                self._listener.close()
                self._listener = None
            self._loop = None
            self._owner = None


class QemuDgramDevice(Device):
    """The guest link over QEMU's ``-netdev dgram`` (one frame per Unix datagram).

    ``fd`` is the bound datagram socket; it stays the caller's (we use a duplicate).
    """

    plain_frames = True

    def __init__(self, fd: int, name: str = "qemu") -> None:
        super().__init__(fd, name)
        self._owner: DeviceOwner | None = None
        self._sock: socket.socket | None = None
        #: Where QEMU's datagrams come from (its ``local.path``); None until the first one.
        self.peer: str | None = None
        self.filters_frames = True

    def start(self, owner: DeviceOwner) -> None:
        self._owner = owner
        self._sock = socket.socket(fileno=os.dup(self.fd))
        self._sock.setblocking(False)
        owner.loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        sock = self._sock
        owner = self._owner
        if sock is None or owner is None:
            return
        now = owner.loop.time()
        receive = owner.receive
        count = owner.count
        for _ in range(_DGRAM_BATCH):
            try:
                data, _anc, flags, addr = sock.recvmsg(MAX_FRAME)
            except BlockingIOError:
                break
            except OSError as exc:
                owner.link_lost(f"reading the QEMU datagram socket failed: {exc.strerror}")
                return
            if flags & socket.MSG_TRUNC:
                # Bigger than any frame QEMU sends: not a frame; never hand on a cut one.
                count("drop.rx.too_big")
                continue
            if not addr:
                # An unbound sender: we could never answer it, and QEMU always binds.
                count("drop.rx.unbound_peer")
                continue
            if addr != self.peer:
                if self.peer is not None:
                    log.info("%s: QEMU now sends from %s", self.name, addr)
                self.peer = addr
            if len(data) < _ETH_HEADER:
                count("drop.rx.runt")
                continue
            receive(memoryview(data), now)
        owner.input_done(now)

    def write_frame(self, parts: Sequence[Any]) -> bool:
        peer = self.peer
        owner = self._owner
        if peer is None or self._sock is None or owner is None:
            if owner is not None:
                owner.count("drop.tx.no_peer")
            return False
        try:
            self._sock.sendmsg(parts, (), 0, peer)
        except BlockingIOError:
            owner.count("drop.tx.tap_full")
            return False
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                # QEMU went away (its socket file is gone); wait for it to speak again.
                log.info("%s: QEMU at %s is gone", self.name, peer)
                self.peer = None
            owner.count("drop.tx.error")
            return False
        return True

    def _attach_filter(self, program: bytes) -> None:
        if self._sock is None:
            raise OSError("the QEMU datagram socket is closed")
        framefilter.attach_socket(self._sock, program)

    def _detach_filter(self) -> None:
        if self._sock is not None:
            framefilter.detach_socket(self._sock)

    def close(self) -> None:
        if self._sock is not None and self._owner is not None:
            self._owner.loop.remove_reader(self._sock.fileno())
            if self._filtered:
                # The socket is the caller's too (ours is a duplicate): leave it as given.
                self.set_frame_filter(None, None)
            self._sock.close()
        self._sock = None
        self._owner = None


def serve_qemu(spec: ServeSpec) -> int:
    """``pyslirp --target-type=qemu-stream|qemu-dgram SOCKET``: serve a VM until killed."""
    from pyslirp.runtime.main import Server, signal_ready

    stream = spec.target_type == "qemu-stream"
    path = spec.target
    if spec.hardening.sandbox and not stream:
        # We answer to QEMU's local.path by name; the sandbox's root has no such path.
        log.error("--enable-sandbox is not supported with --target-type=qemu-dgram: replies "
                  "go to QEMU's socket by its path, which the sandbox hides "
                  "(--enable-seccomp is)")
        return 1
    config = spec.fresh_config()
    config.vnet_hdr = False
    config.offload = False
    try:
        sock = bind_unix(path, socket.SOCK_STREAM if stream else socket.SOCK_DGRAM)
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    ino = os.lstat(path).st_ino  # the file, not the socket (fstat gives sockfs)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)),
                     os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    cls: type[Device] = QemuStreamDevice if stream else QemuDgramDevice
    try:
        server = Server(sock.fileno(), config, tap_name=path, pcap_path=spec.pcap,
                        dns_upstreams=list(spec.dns_upstreams), device_class=cls)
    except (OSError, ValueError) as exc:
        log.error("%s", exc)
        sock.close()
        _remove_socket_file(path, ino, dir_fd)
        os.close(dir_fd)
        return 1
    try:
        if spec.exit_fd is not None:
            server.watch_fd_for_exit(spec.exit_fd)
        outbound = server.attachment.host.outbound
        outbound.ipv4 = spec.outbound_addr
        outbound.ipv6 = spec.outbound_addr6
        if spec.api is not None:
            try:
                # A VM takes the first DHCP address, not a namespace's configured one.
                server.serve_api(spec.api, str(config.network.network_address + 15))
            except OSError as exc:
                log.error("%s", exc)
                server.stop(1)
        log.info("serving QEMU %s at %s (MTU %d, %s%s)", "-netdev stream" if stream
                 else "-netdev dgram", path, config.mtu, config.network,
                 f", {config.network6}" if config.enable_ipv6 else "")
        from pyslirp.runtime.sandbox import apply as apply_hardening

        if not apply_hardening(spec.hardening, own_userns=True):
            server.stop(1)
            return server.run()
        return server.run(on_ready=lambda: signal_ready(spec.ready_fd))
    finally:
        sock.close()
        _remove_socket_file(path, ino, dir_fd)
        os.close(dir_fd)
