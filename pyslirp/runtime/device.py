"""Devices: what carries a guest's Ethernet frames to and from an attachment.

Theory of operation
-------------------
A device reads the guest's frames, writes the frames the stack sends, and
reports when the link is gone; nothing else. The stack, the host sockets, the
timers, pcap and fault injection belong to the attachment that composes it
(:mod:`pyslirp.runtime.attachment`), so a new kind of link is one small
class: the TAP here (:class:`TapDevice`), QEMU's ``-netdev stream`` and
``-netdev dgram`` sockets in :mod:`pyslirp.runtime.qemu`.

The contract, in the order things happen:

* ``Device(fd, name)`` only remembers its fd and name (for log lines); it
  opens nothing, so an attachment that refuses the device (a plain-frame
  device with ``config.vnet_hdr`` on) leaves nothing behind.
* :meth:`Device.start` gets the attachment's :class:`DeviceOwner` and registers
  with its loop. For each frame read it calls ``owner.receive(frame, now)``
  (``frame`` a memoryview the stack may keep, so over a buffer that is not
  reused), and once per batch ``owner.input_done(now)``: that batch's
  coalesced ACKs and the timer re-arm. A device that reads many frames in
  one callback may run ``owner.run_deferred()`` between two of them when
  ``owner.deferred`` is non-empty (the TAP does: a loopback connect's SYN-ACK
  then goes out before the next frame is handled); ``input_done`` runs what
  is left. Drops are counted with ``owner.count(name)``; a link that cannot
  come back (the TAP deleted) is reported with ``owner.link_lost(message)``.
* :meth:`Device.write_frame` gets the stack's frames (a sequence of buffers:
  headers, then payload, never joined by the stack) and returns whether the
  device took the frame (pcap records only those). The parts may be reused
  once it returns: a device that queues a frame copies it.
* :meth:`Device.close` unregisters from the loop and closes what the device
  opened (never the fd it was given: whoever opened it closes it).

The per-frame path gains no call by going through a device: ``owner.receive``
is ``Stack.receive_frame`` itself unless pcap or fault injection is on, and
the stack holds the device's bound ``write_frame`` as its frame sink.

:class:`TapDevice` reads a TAP fd (any fd with one frame per ``read``, such
as a datagram socketpair in tests) until EAGAIN, at most ``_TAP_BATCH``
frames per callback (so a burst costs one loop wake-up and one ``input_done``),
and writes each frame with one ``os.writev``, header and
payload as separate buffers, so a 64 KB payload is never copied. While the
stack sheds a flood (``owner.shedding`` non-empty: a UDP flow sending to ever
new destinations past admission, :meth:`pyslirp.stack.udp.UdpEngine.shed`),
each frame is first offered to ``owner.shed`` as the bytes read, and dropped
there if the stack would refuse it anyway: ~1 us a frame instead of the ~3 us
parse, so a guest flooding from one socket no longer outruns the reader (its
kernel drops frames of every flow at the TAP queue when we fall behind, the
download's ACKs with them). Otherwise the test costs one truth test. While
the guest floods, the attachment reviews the stack's flood filters and hands
them to :meth:`Device.set_frame_filter`: the TAP's socket filter then drops most of the
flood in the guest's kernel, before it takes a place in the queue or a read
(:mod:`pyslirp.runtime.framefilter`; QEMU's ``-netdev dgram`` socket takes the
same program). A device that cannot filter (QEMU's stream) keeps
``filters_frames`` False and the stack sheds after the read.

A request/response guest sends one short frame and waits: reading on to EAGAIN
then costs a syscall and a raised BlockingIOError (~1.1 us) per exchange for
nothing (issue 14). So once a wake-up has found exactly one short frame
(``_LONE_FRAME``) and nothing behind it, the next ones stop after their first
frame while it is short and no TCP flow holds a byte (``owner.tcp_idle()``: no
data in flight to the guest, whose ACKs would come in runs). The loop's readers
are level-triggered, so a frame left behind is not lost: it wakes the loop at
once, and a wake-up that soon after such a stop (``_LONE_REFILL_GAP``) reads to
EAGAIN again. Bulk keeps whole batches: long frames, or data in flight, always
read on (tests/runtime/test_tap_reads.py). Frames the
kernel does not take (queue full) are dropped and counted
(``drop.tx.tap_full``), like a NIC would; TCP retransmits.

Before the flood filter, what limited a guest's download during its own UDP
flood was not this reader's share of the CPU but the wait of the guest's ACKs
behind the flood in the TAP ring
(ping through it: ~0.1 ms idle, 1.3-1.6 ms average and 8 ms peaks under the
UDP flood), against the flow's send window (``TcpConfig.snd_buf``). Measured
with ``bench/run.py --only flood`` (A/B pairs in one session, 2026-12-01):
fewer frames per callback while shedding (16; against a separate unloaded run)
or more (1,024), a ring of 64 (separate run) or 8,000 slots did not raise the
download's share or lowered it; a 16 MiB
``snd_buf`` raised it from a median 31 % to 53 % (5 of 5 pairs), but cost an
unloaded download ~12 % of its rate at MTU 65520. So the batch stays one size,
and the send limit grows only while the ACKs come late
(``TcpFlow._tune_send_limit`` in :mod:`pyslirp.stack.tcp`: up to
``TcpConfig.snd_buf_max``, 16 MiB, undone when it does not raise the rate,
back to ``snd_buf`` once the ACKs are prompt). A/B against the fixed 4 MiB
(2026-12-01, 5 interleaved pairs, a machine shared with other benchmarks):
UDP flood median 30.8 -> 35.0 %, SYN flood 40.5 -> 46.5 % (with SYN shedding,
:meth:`pyslirp.stack.tcp.TcpEngine.shed_syn`), each better in 4 of 5 pairs.
Under a SYN flood the stack's CPU, not the ACKs, holds the download back
(py-spy before SYN shedding: ~35-40 % of its samples on the flood's frames);
a grown limit there cost 1-16 points in 6 of 6 pairs before growth that does
not pay was undone.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence, Sized
from typing import Any, ClassVar, Protocol

from pyslirp.runtime import framefilter
from pyslirp.stack.tcp import SynFloodFilter
from pyslirp.stack.udp import FloodFilter
from pyslirp.wire import vnet

log = logging.getLogger("pyslirp")

_TAP_BATCH = 128
_TAP_READ_SIZE = 65536 + 4096 + vnet.HEADER_LEN
#: A frame shorter than this is a small transaction's (a request, an ACK), not bulk.
_LONE_FRAME = 512
#: A wake-up sooner than this after stopping at a lone frame was not a new frame
#: arriving (that takes a peer's round trip: tens of microseconds) but the frames
#: queued behind it: that wake-up reads until EAGAIN again.
_LONE_REFILL_GAP = 10e-6
#: The clock of that gap and of busy polling (Attachment.keep_polling): microseconds
#: matter there, and uvloop's own clock ticks in whole milliseconds.
poll_clock = time.perf_counter


class DeviceOwner(Protocol):
    """What the attachment that owns a device offers it (pyslirp.runtime.attachment)."""

    loop: asyncio.AbstractEventLoop
    #: Hands one guest frame to the stack: ``(frame, now)``.
    receive: Callable[[memoryview, float], None]
    #: Host-socket work waiting for the stack's current call to return (usually empty).
    deferred: list[Any]
    #: Runs :attr:`deferred`; the batch's ``input_done`` flushes.
    run_deferred: Callable[[], None]
    #: Non-empty while the stack sheds a flood (``UdpEngine.shedding``); then
    #: ``shed(frame, now)`` says whether to drop a frame before ``receive``.
    shedding: Sized
    shed: Callable[[bytes, float], bool]

    def tcp_idle(self) -> bool:
        """No TCP flow holds a byte: none is in flight to the guest (whose ACKs would
        follow) nor waiting for a host socket."""

    def input_done(self, now: float) -> None:
        """A batch of guest frames is in: deferred work, then one ``Stack.flush``."""

    def count(self, name: str, n: int = 1) -> None:
        """Count ``n`` events under ``name``, e.g. ``drop.tx.no_peer``."""

    def link_lost(self, message: str) -> None:
        """The link is gone for good: log ``message`` and let the owner stop."""


class Device:
    """Carries Ethernet frames between the guest and an attachment; see the module docstring."""

    #: Frames are bare Ethernet, never with a virtio-net header or GSO: the
    #: attachment refuses a config with ``vnet_hdr`` or ``offload`` on.
    plain_frames: ClassVar[bool] = False
    #: The device can drop a flood's frames before they are read
    #: (:meth:`set_frame_filter`); cleared if the kernel refuses.
    filters_frames: bool = False

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        #: A frame filter is on (set_frame_filter).
        self._filtered = False

    def set_frame_filter(self, udp: FloodFilter | None, syn: SynFloodFilter | None) -> bool:
        """Drop what ``udp`` and ``syn`` describe before reading it (both None: read
        everything), with the kernel's socket filter (:mod:`pyslirp.runtime.framefilter`,
        through :meth:`_attach_filter`); False if the device cannot (it then reads
        everything, and the stack sheds after the read)."""
        wanted = udp is not None or syn is not None
        if not self.filters_frames:
            return not wanted
        try:
            if wanted:
                self._attach_filter(framefilter.flood_program(udp, syn))
            elif self._filtered:
                self._detach_filter()
        except OSError as exc:
            # Not a TAP (a socketpair in tests), or a kernel without the call.
            self.filters_frames = False
            log.warning("%s: cannot drop flood frames before reading them (%s); "
                        "they are refused after the read", self.name, exc.strerror or exc)
            return not wanted
        self._filtered = wanted
        return True

    def _attach_filter(self, program: bytes) -> None:
        raise OSError(f"{type(self).__name__} has no frame filter")

    def _detach_filter(self) -> None:
        raise OSError(f"{type(self).__name__} has no frame filter")

    def start(self, owner: DeviceOwner) -> None:
        """Register with ``owner.loop``; from now on frames go to ``owner.receive``."""
        raise NotImplementedError

    def write_frame(self, parts: Sequence[Any]) -> bool:
        """Send one frame to the guest; False if it was dropped (and counted)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop reading; close what :meth:`start` opened."""
        raise NotImplementedError


class TapDevice(Device):
    """A TAP fd (or any fd that gives one frame per read); see the module docstring."""

    def __init__(self, fd: int, name: str = "tap0") -> None:
        super().__init__(fd, name)
        self._owner: DeviceOwner | None = None
        self._count: Callable[[str], None] = _ignore
        #: The last wake-up found one short frame and nothing behind it (see _LONE_*).
        self._lone = False
        #: ``poll_clock()`` when the last wake-up stopped after a lone frame, else 0.
        self._stopped_at = 0.0
        self.filters_frames = True

    def start(self, owner: DeviceOwner) -> None:
        self._owner = owner
        self._count = owner.count
        os.set_blocking(self.fd, False)
        owner.loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        owner = self._owner
        assert owner is not None
        fd = self.fd
        now = owner.loop.time()
        receive = owner.receive
        deferred = owner.deferred
        shedding, shed = owner.shedding, owner.shed
        # Stop after a lone short frame (see _LONE_*): unless this wake-up came right
        # after such a stop, which says frames were queued behind that one.
        lone = self._lone and poll_clock() - self._stopped_at >= _LONE_REFILL_GAP
        stopped_early = False
        frames = 0
        for _ in range(_TAP_BATCH):
            try:
                data = os.read(fd, _TAP_READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                owner.link_lost(f"reading TAP device {self.name} failed: {exc.strerror}")
                return
            if not data:
                owner.link_lost(f"TAP device {self.name} closed")
                return
            frames += 1
            if shedding and shed(data, now):
                continue  # refused from the raw bytes: a flood must not outrun us
            receive(memoryview(data), now)
            if deferred:
                owner.run_deferred()
            if lone:
                if len(data) < _LONE_FRAME and owner.tcp_idle():
                    stopped_early = True
                    break
                lone = False
        owner.input_done(now)
        if stopped_early:
            self._stopped_at = poll_clock()
        else:
            # Read until EAGAIN: nothing left behind; one short frame makes us lone.
            self._lone = frames == 1 and len(data) < _LONE_FRAME
            self._stopped_at = 0.0

    def write_frame(self, parts: Sequence[Any]) -> bool:
        try:
            os.writev(self.fd, parts)
        except BlockingIOError:
            self._count("drop.tx.tap_full")
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EBADFD, errno.ENODEV) and self._owner is not None:
                self._owner.link_lost(f"TAP device {self.name} went away: {exc.strerror}")
            else:
                self._count("drop.tx.error")
            return False
        return True

    def _attach_filter(self, program: bytes) -> None:
        framefilter.attach(self.fd, program)

    def _detach_filter(self) -> None:
        framefilter.detach(self.fd)

    def close(self) -> None:
        if self._owner is not None:
            self._owner.loop.remove_reader(self.fd)
            self._owner = None
            if self._filtered:
                # The fd is its opener's to close, and may outlive us: leave it as given.
                self.set_frame_filter(None, None)


def _ignore(_name: str) -> None:
    """Counts nothing: a device's counter before it is started."""
