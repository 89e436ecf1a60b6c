"""The runtime: one event loop that owns every file descriptor.

Theory of operation
-------------------
An :class:`Attachment` is one guest link, composed of three parts:

* a *device* (:class:`~pyslirp.runtime.device.Device`) that carries the
  guest's Ethernet frames: a TAP (:class:`~pyslirp.runtime.device.TapDevice`)
  or QEMU's stream or datagram socket (:mod:`pyslirp.runtime.qemu`);
* the :class:`~pyslirp.stack.stack.Stack` serving the link (sans-I/O);
* the host side (:class:`~pyslirp.runtime.hostsockets.HostSockets`), the
  stack's :class:`~pyslirp.stack.host.HostPort`: the host sockets of its flows.

The attachment itself owns what ties them together: the pacing (batching,
timers, busy polling), the pcap writer and the test-only fault injector. A
device only reads and writes frames; the host side only serves sockets.

Batching is what makes Python fast enough here (docs/architecture.md, costs):

* a readable device is drained (a batch of frames) in one callback, which
  ends with one :meth:`Attachment.input_done`: one ``Stack.flush``
  (coalesced ACKs) and timer re-arm;
* a readable host socket is read and flushed in its own callback
  (:meth:`Attachment.flush_now`); other work schedules one flush with
  ``call_soon`` (:meth:`Attachment.schedule_flush`), so it coalesces over the
  callbacks of one loop iteration;
* frames to the guest go to the device as the stack makes them, header and
  payload as separate buffers, so a 64 KB payload is never copied.

No call is added per frame by the composition: unless pcap or fault
injection is on, the device hands frames to ``Stack.receive_frame`` itself
(:attr:`Attachment.receive`) and the stack holds the device's bound
``write_frame`` as its frame sink. With pcap or faults on, one wrapper per
direction sits in between (``_receive_captured`` / ``_write_captured``, or
the fault-injecting ones); pcap records only frames the device took.

Busy polling (``NetConfig.busy_poll``, ``--busy-poll``): after a burst of work
the attachment keeps one ``call_soon`` callback alive for a few tens of
microseconds, so the loop polls with a zero timeout instead of sleeping. In a
request/response exchange the peer's answer usually comes within that time,
and waking a sleeping process (on a VM: a halted virtual CPU) costs more than
the polling. Measured on this machine kind: 1-byte TCP round trip p50 ~210 us
-> ~130 us, with *less* CPU per round trip (bench/README.md, "Latency").
Bulk traffic keeps the loop busy anyway, and an idle stack does not poll. A
stream of host datagrams (a UDP read that found several waiting, or came right
after the last) flushes without polling (:meth:`Attachment.schedule_quiet_flush`):
its next datagram wakes the loop anyway, and on 2 CPUs the poll only took CPU
from the processes at both ends.

The runtime deliberately keeps no per-packet logging; counters live in the
stack's link and are logged at exit and on demand.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence, Sized
from typing import Any, cast

from pyslirp.runtime import malloc
from pyslirp.runtime.device import Device, poll_clock
from pyslirp.runtime.hostsockets import HostSockets
from pyslirp.runtime.pcap import PcapWriter
from pyslirp.stack.admission import FLOOD_REVIEW_INTERVAL
from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import FrameSink
from pyslirp.stack.stack import Stack

log = logging.getLogger("pyslirp")

_malloc_tuned = False


def timer_tick_after(deadline: float) -> float:
    """The first whole millisecond of the loop's clock past ``deadline``.

    uvloop's clock (libuv's) ticks in whole milliseconds and its timers round to
    them: a timer armed for a deadline between two ticks fires on the tick before
    it, the stack finds nothing due, and the timer re-armed for the same deadline
    fires again at once, hundreds of times, until the clock ticks past it
    (measured: 338 wake-ups for one +203.4 ms deadline). Armed for the tick after,
    it fires once, at most a millisecond late."""
    return (math.floor(deadline * 1000.0) + 1) / 1000.0


class Attachment:
    """One guest link: a device, the stack serving it, and the host sockets of its flows."""

    def __init__(self, loop: asyncio.AbstractEventLoop, device: Device, config: NetConfig,
                 pcap: PcapWriter | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        if device.plain_frames and (config.vnet_hdr or config.offload):
            raise ValueError(f"{type(device).__name__} carries plain frames: "
                             "config.vnet_hdr and config.offload must be False")
        self.loop = loop
        self.device = device
        self.config = config
        self.pcap = pcap
        self._on_fatal = on_fatal
        self._flush_scheduled = False
        #: The scheduled flush was asked for only by work that keeps no busy polling
        #: (see schedule_quiet_flush).
        self._flush_quiet = False
        self.busy_poll = config.busy_poll
        self._poll_until = 0.0
        self._polling = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._faults = _faults_from_env()
        global _malloc_tuned
        if not _malloc_tuned:
            _malloc_tuned = True
            malloc.tune()
        self.host = HostSockets(loop, self)
        self.stack = Stack(config, self._frame_sink(), self.host)
        self.host.stack = self.stack
        #: What the device calls per guest frame (see _frame_source).
        self.receive = self._frame_source()
        #: The host side's deferred work and its runner, for the device (device.DeviceOwner).
        self.deferred = self.host.deferred
        self.run_deferred = self.host.run_deferred
        #: Flood shedding before the parse (device.DeviceOwner); never with pcap or
        #: faults, which must see every frame: an empty dict that stays empty.
        plain = self._faults is None and self.pcap is None
        self.shedding: Sized = self.stack.udp.shedding if plain else {}
        self.shed: Callable[[bytes, float], bool] = self.stack.udp.shed
        #: The next review of the flood filters (see watch_flood), while one is due;
        #: whether floods are watched at all (the device can filter, nothing must see
        #: every frame).
        self._flood_review: asyncio.TimerHandle | None = None
        self._watch_floods = plain and device.filters_frames
        self.count = self.stack.link.count
        device.start(self)

    @property
    def name(self) -> str:
        """The link's name in log lines: the TAP's, the QEMU socket's, a container's."""
        return self.device.name

    # ---- the frame path between device and stack ---------------------------------------
    def _frame_sink(self) -> FrameSink:
        """What the stack calls per frame to the guest: the device's bound write_frame
        itself unless pcap or faults need a wrapper (no call is added per frame)."""
        write: Callable[[Sequence[Any]], object] = self.device.write_frame
        if self._faults is not None:
            write = self._send_with_faults
        elif self.pcap is not None:
            write = self._write_captured
        # The stack ignores write_frame's result (whether the device took the frame).
        return cast(FrameSink, write)

    def _frame_source(self) -> Callable[[memoryview, float], None]:
        """What the device calls per guest frame: Stack.receive_frame itself unless pcap
        or faults need a wrapper."""
        if self._faults is not None:
            return self._receive_with_faults
        if self.pcap is not None:
            return self._receive_captured
        return self.stack.receive_frame

    def _write_captured(self, parts: Sequence[Any]) -> None:
        if self.device.write_frame(parts) and self.pcap is not None:
            self.pcap.write(parts, time.time())

    def _receive_captured(self, frame: memoryview, now: float) -> None:
        if self.pcap is not None:
            self.pcap.write(frame, time.time())
        self.stack.receive_frame(frame, now)

    def _send_with_faults(self, parts: Sequence[Any]) -> None:
        for frame in self._faults.process(b"".join(parts), "to_guest"):
            self._write_captured((frame,))
        self._release_held_frames_later("to_guest")

    def _receive_with_faults(self, frame: memoryview, now: float) -> None:
        if self.pcap is not None:
            self.pcap.write(frame, time.time())
        for passed in self._faults.process(frame, "from_guest"):
            self.stack.receive_frame(memoryview(passed), now)
        self._release_held_frames_later("from_guest")

    def _release_held_frames_later(self, direction: str) -> None:
        """A reordering fault holds a frame back; let it go after the hold time at most."""
        if self._faults.injector(direction).holding:
            self.loop.call_later(self._faults.hold_seconds, self._release_held_frames, direction)

    def _release_held_frames(self, direction: str) -> None:
        if self._closed:
            return
        for frame in self._faults.flush(direction):
            if direction == "to_guest":
                self._write_captured((frame,))
            else:
                self.stack.receive_frame(memoryview(frame), self.loop.time())
        self.schedule_flush()

    def link_lost(self, message: str) -> None:
        """The device's link is gone for good (device.DeviceOwner)."""
        log.error("%s", message)
        if self._on_fatal is not None:
            self._on_fatal(message)

    def tcp_idle(self) -> bool:
        """No TCP flow holds a byte (device.DeviceOwner): none is in flight to the guest
        (whose ACKs would follow) nor waiting for a host socket."""
        return not self.stack.tcp.buffered

    def watch_flood(self) -> None:
        """The guest floods: review the stack's flood filters every
        ``FLOOD_REVIEW_INTERVAL`` until the flood is over, giving the device each new
        pair (``Stack.review_floods``, pyslirp.runtime.framefilter)."""
        if self._flood_review is None and not self._closed:
            self.stack.review_floods(self.loop.time())  # the baseline
            self._flood_review = self.loop.call_later(FLOOD_REVIEW_INTERVAL,
                                                      self._review_flood)

    def _review_flood(self) -> None:
        self._flood_review = None
        stack = self.stack
        if self._closed or not self.device.filters_frames:
            return
        udp, tcp = stack.udp, stack.tcp
        if stack.review_floods(self.loop.time()) and not self.device.set_frame_filter(
                udp.flood_filter, tcp.syn_flood_filter):
            # The device reads everything: the stack sheds after the read.
            udp.flood_filter = tcp.syn_flood_filter = None
            self._watch_floods = False
            return
        if (udp.flood_filter is not None or tcp.syn_flood_filter is not None
                or udp.flood_watch.flood_rate or tcp.syn_flood_watch.flood_rate):
            self._flood_review = self.loop.call_later(FLOOD_REVIEW_INTERVAL,
                                                      self._review_flood)

    # ---- batching and timers ----------------------------------------------------
    def input_done(self, now: float) -> None:
        """After a batch of guest frames: answer finished connects, then flush."""
        if self._closed:
            return
        if self.deferred:
            self.run_deferred()
        if self._watch_floods and self._flood_review is None and (
                self.shedding or self.stack.tcp.syn_shed_until > now):
            self.watch_flood()
        # flush_now's body, inline: this runs once per device callback.
        self.stack.flush(now)
        self.arm_timer()
        if self.busy_poll:
            self.keep_polling(now)

    def schedule_flush(self) -> None:
        """Run one ``Stack.flush`` and timer re-arm after this loop iteration's callbacks."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        else:
            self._flush_quiet = False

    def schedule_quiet_flush(self) -> None:
        """As :meth:`schedule_flush`, but this work starts no busy polling: a stream of
        host datagrams wakes the loop by itself, and polling between them only took
        CPU from the processes at both ends (UDP download at 300 Mbit/s: 6.4-7.1 us
        of CPU per datagram polling, 4.9-5.2 not; bench/README.md)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flush_quiet = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        if self._flush_quiet:
            self._flush_quiet = False
            self.stack.flush(self.loop.time())
            self.arm_timer()
        else:
            self.flush_now(self.loop.time())

    def flush_now(self, now: float) -> None:
        """``Stack.flush`` now, re-arm the timer, keep busy polling."""
        self.stack.flush(now)
        self.arm_timer()
        if self.busy_poll:
            self.keep_polling(now)

    def keep_polling(self, now: float) -> None:
        """Poll instead of sleeping until ``busy_poll`` after this burst of work.

        Timed on :func:`poll_clock`, not the loop's clock: uvloop's ticks in whole
        milliseconds, so a 50 us poll on it lasted until the next tick (0.5 ms on
        average: measured ~560 us of CPU per exchange at one exchange a millisecond)."""
        self._poll_until = poll_clock() + self.busy_poll
        if not self._polling:
            self._polling = True
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        # A pending callback makes the loop's next epoll_wait return at once.
        if not self._closed and poll_clock() < self._poll_until:
            self.loop.call_soon(self._poll)
        else:
            self._polling = False

    def arm_timer(self) -> None:
        """Re-arm the loop timer at the stack's next deadline (if it moved)."""
        deadline = self.stack.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(timer_tick_after(deadline), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        now = self.loop.time()
        self.stack.run_timers(now)
        self.stack.flush(now)
        self.arm_timer()

    # ---- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        """Reset every flow, close every host socket, then the device."""
        if self._closed:
            return
        now = self.loop.time()
        try:
            self.stack.close_all(now)
        finally:
            self._closed = True
            self.host.close()
            if self._timer is not None:
                self._timer.cancel()
            if self._flood_review is not None:
                self._flood_review.cancel()
            try:
                self.device.close()  # after close_all: a stream sends the RSTs it queued
            finally:
                if self.pcap is not None:
                    self.pcap.close()
                counters = self.stack.counters
                if counters:
                    log.info("counters for %s: %s", self.name,
                             ", ".join(f"{k}={v}" for k, v in sorted(counters.items())))


def _faults_from_env() -> Any:
    if not os.environ.get("PYSLIRP_FAULTS"):
        return None
    from pyslirp.runtime.faults import from_env

    faults = from_env()
    log.warning("PYSLIRP_FAULTS=%s: injecting faults on the guest link (test only)",
                os.environ["PYSLIRP_FAULTS"])
    return faults
