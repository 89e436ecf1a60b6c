"""Test doubles for the sans-I/O stack: a recording host, a capturing link, a fake clock.

Generic on purpose: any engine's tests can use them.

* :class:`FakeClock` holds ``now`` and, with a :class:`Timers`, runs what is due
  as time advances.
* :class:`CaptureSink` collects every frame a :class:`Link` sends (parts joined
  into ``bytes``); :func:`make_link` wires one up with a known guest MAC.
* :class:`FakeHost` implements :class:`~pyslirp.stack.host.HostPort`: it records
  every call in ``calls`` as ``(method, flow, *args)``, keeps what was written
  per flow in ``written[flow]``, and accepts at most ``accept`` bytes per
  ``tcp_write`` (None: everything), so tests can model a host socket that is slow
  or never reads.
* :class:`StackHarness` is the one rig the stack tests share: a real
  :class:`~pyslirp.stack.stack.Stack` (so its link, timers, engines and address
  policy ``host_targets``) over a :class:`CaptureSink` and a :class:`FakeHost`,
  with a :class:`FakeClock` over the stack's timers. Frames go in as bytes through
  ``receive_frame`` (:meth:`StackHarness.send_frame`, :meth:`StackHarness.send_ipv4`);
  what the guest got comes back with :meth:`StackHarness.replies`. An engine's
  tests subclass it and drive the stack's engine (or one built with other limits
  on the same link) directly.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import Buffer, Link
from pyslirp.stack.stack import Stack
from pyslirp.stack.timers import Timers
from pyslirp.wire import ethernet, vnet
from pyslirp.wire.checksum import checksum

GUEST_MAC = bytes.fromhex("020000000064")


class FakeClock:
    def __init__(self, timers: Timers | None = None, start: float = 1000.0) -> None:
        self.now = start
        self.timers = timers

    def advance(self, seconds: float) -> float:
        """Move time forward, firing due timers in deadline order on the way."""
        end = self.now + seconds
        if self.timers is not None:
            while True:
                d = self.timers.next_deadline()
                if d is None or d > end:
                    break
                self.now = max(self.now, d)
                self.timers.run(self.now)
        self.now = end
        return end

    def run_until_idle(self, limit: float = 3600.0) -> None:
        """Fire timers until none is left (or ``limit`` seconds have passed)."""
        end = self.now + limit
        assert self.timers is not None
        while True:
            d = self.timers.next_deadline()
            if d is None or d > end:
                return
            self.now = max(self.now, d)
            self.timers.run(self.now)


class CaptureSink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        #: Number of parts of each frame as the link got them (payloads unjoined).
        self.part_counts: list[int] = []

    def __call__(self, parts: Sequence[Buffer]) -> None:
        self.frames.append(b"".join(bytes(p) for p in parts))
        self.part_counts.append(len(parts))

    def take(self) -> list[bytes]:
        out, self.frames = self.frames, []
        self.part_counts = []
        return out


def make_link(config: NetConfig | None = None, guest_mac: bytes = GUEST_MAC
              ) -> tuple[Link, CaptureSink]:
    config = config or NetConfig()
    sink = CaptureSink()
    link = Link(config, sink)
    link.guest_mac = guest_mac
    return link, sink


class FakeHost:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.written: defaultdict[Any, bytearray] = defaultdict(bytearray)
        self.accept: int | None = None
        self.paused: set[Any] = set()
        self.closed: dict[Any, bool] = {}
        self.shut: set[Any] = set()

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def last(self, name: str) -> tuple[Any, ...] | None:
        for c in reversed(self.calls):
            if c[0] == name:
                return c
        return None

    # TCP
    def tcp_connect(self, flow: Any, targets: list[tuple[str, int]]) -> None:
        self.calls.append(("tcp_connect", flow, targets))

    def tcp_write(self, flow: Any, data: Buffer) -> int:
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.written[flow] += bytes(data[:n])
        self.calls.append(("tcp_write", flow, n))
        return n

    def tcp_shutdown_write(self, flow: Any) -> None:
        self.shut.add(flow)
        self.calls.append(("tcp_shutdown_write", flow))

    def tcp_pause_reading(self, flow: Any) -> None:
        self.paused.add(flow)
        self.calls.append(("tcp_pause_reading", flow))

    def tcp_resume_reading(self, flow: Any) -> None:
        self.paused.discard(flow)
        self.calls.append(("tcp_resume_reading", flow))

    def tcp_close(self, flow: Any, reset: bool) -> None:
        self.closed[flow] = reset
        self.calls.append(("tcp_close", flow, reset))

    # UDP
    def udp_open(self, flow: Any) -> bool:
        self.calls.append(("udp_open", flow))
        return True

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Any, segment: int = 0) -> None:
        if not segment:
            self.calls.append(("udp_send", flow, dst, bytes(data)))
            return
        # One record per datagram, as the host's peer would see them.
        whole = b"".join(data)
        for start in range(0, len(whole), segment):
            self.calls.append(("udp_send", flow, dst, whole[start:start + segment]))

    def udp_close(self, flow: Any) -> None:
        self.calls.append(("udp_close", flow))

    # ICMP
    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Buffer) -> bool:
        self.calls.append(("icmp_echo", flow, dst, ident, seq, bytes(payload)))
        return True

    def icmp_close(self, flow: Any) -> None:
        self.calls.append(("icmp_close", flow))

    # DNS
    def dns_send(self, query: Any, upstream: tuple[str, int], data: Buffer) -> None:
        self.calls.append(("dns_send", query, upstream, bytes(data)))

    def dns_cancel(self, query: Any) -> None:
        self.calls.append(("dns_cancel", query))

    def dns_release(self, upstream: tuple[str, int]) -> None:
        self.calls.append(("dns_release", upstream))


def complete_checksum(frame: bytes) -> bytes:
    """Strip the vnet header, doing what the guest's kernel does for NEEDS_CSUM."""
    flags, gso_type, _hdr_len, _gso_size, start, offset, _n = vnet.unpack(frame)
    assert gso_type == vnet.GSO_NONE
    out = bytearray(frame[vnet.HEADER_LEN:])
    if flags & vnet.F_NEEDS_CSUM:
        # The field holds the pseudo-header sum; the sum runs from csum_start to the end.
        struct.pack_into("!H", out, start + offset, checksum(out[start:]))
    else:
        assert flags == 0
    return bytes(out)


class StackHarness:
    """A whole :class:`Stack` over a recording link and host, with a fake clock.

    ``cfg`` goes to :class:`NetConfig` (``vnet_hdr`` defaults to False here, so
    frames are plain Ethernet unless a test asks for the header); ``host`` replaces
    the plain :class:`FakeHost` (a subclass with switches, say); ``start`` is the
    clock's first ``now``.
    """

    def __init__(self, host: FakeHost | None = None, start: float = 1000.0,
                 **cfg: Any) -> None:
        cfg.setdefault("vnet_hdr", False)
        self.config = NetConfig(**cfg)
        self.sink = CaptureSink()
        self.host = FakeHost() if host is None else host
        self.stack = Stack(self.config, self.sink, self.host)
        self.link = self.stack.link
        self.timers = self.stack.timers
        self.clock = FakeClock(self.timers, start)
        #: The NAT's address policy, as every engine of the stack applies it.
        self.policy = self.stack.host_targets

    @property
    def now(self) -> float:
        return self.clock.now

    @now.setter
    def now(self, value: float) -> None:
        self.clock.now = value

    @property
    def frames(self) -> list[bytes]:
        """Frames sent to the guest and not taken yet, exactly as the sink got them."""
        return self.sink.frames

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.link.counters)

    def advance(self, seconds: float) -> None:
        """Let time pass, firing timers at their deadlines."""
        self.clock.advance(seconds)

    # ---- guest -> stack
    def send_frame(self, frame: bytes) -> None:
        """One frame from the guest (with a vnet header if the link has one), then a flush."""
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)

    def send_ipv4(self, packet: bytes, src_mac: bytes = GUEST_MAC,
                  dst_mac: bytes | None = None) -> None:
        """One IPv4 packet from the guest, framed as its kernel would (to our MAC)."""
        self.send_frame(self.frame(ethernet.ETHERTYPE_IPV4, packet, src_mac, dst_mac))

    def frame(self, ethertype: int, payload: bytes, src_mac: bytes = GUEST_MAC,
              dst_mac: bytes | None = None) -> bytes:
        """``payload`` in an Ethernet frame to our MAC (and a plain vnet header if needed)."""
        head = ethernet.header(self.link.our_mac if dst_mac is None else dst_mac, src_mac,
                               ethertype)
        return (vnet.PLAIN if self.config.vnet_hdr else b"") + head + payload

    # ---- stack -> guest
    def replies(self) -> list[bytes]:
        """Frames sent to the guest since the last call, as Ethernet frames (the vnet
        header stripped and a checksum left to the guest completed, as its kernel does)."""
        frames = self.sink.take()
        if self.config.vnet_hdr:
            frames = [complete_checksum(f) for f in frames]
        return frames
