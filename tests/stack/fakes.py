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
"""

from __future__ import annotations

import struct
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import Buffer, Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import vnet
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

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Buffer) -> None:
        self.calls.append(("udp_send", flow, dst, bytes(data)))

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
