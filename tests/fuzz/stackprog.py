"""The stack fuzz target: a program of guest frames and host events run against a Stack.

Theory of operation
-------------------
A fuzz input is a *program*: a config byte, then operations, each an opcode byte
and its arguments (:func:`decode`; truncated input reads as zeros, so every byte
string is a valid program and :func:`encode` is its inverse). The operations are
what the runtime does to a :class:`~pyslirp.stack.stack.Stack`: hand it a frame
from the guest, advance the clock (firing due timers), flush, and deliver host
events: a connect finished or failed, host data, EOF, a reset, a socket became
writable, a UDP datagram or ICMP error, a DNS upstream's reply or error, an ICMP
echo reply, a port-forwarded connection (:data:`OPS`).

:class:`ModelHost` is the runtime's side: it implements
:class:`~pyslirp.stack.host.HostPort`, remembers the flows the stack handed it
(a host event names one by index, counted from the newest) and keeps the
runtime's rules, so that the fuzzer only delivers events a real runtime could:
data only to a connected flow that is reading, at most ``host_read_budget()``
bytes, EOF once, nothing after ``tcp_close`` or a failed connect. In turn it
checks the stack's side of the contract: no host call for a flow after
``tcp_close``, no write before the connect finished, no empty connect target list.

After every operation :func:`check_invariants` checks what must hold whatever the
guest sends: every table and buffer within its configured bound, the timer heap
proportional to its live clients, a bounded set of counter names, and every frame
sent to the guest well formed (vnet header, Ethernet, IPv4 with a correct header
checksum and length, a complete or correctly partial L4 checksum). Hangs are caught
by iteration caps, not clocks: a clock advance (and each ``run_timers`` call in
it) may fire at most :data:`MAX_TIMER_RUNS` timers and an operation may send at most
:data:`MAX_FRAMES_PER_OP` frames. At the end of a program every pending connect
fails, the clock moves past every timeout, and the stack must have dropped every
flow and every buffer (nothing leaks); then ``close_all``.

Determinism: the TCP engine's ISS generator and the DNS forwarder's ID source are
seeded, so the same program always does the same thing.
"""

from __future__ import annotations

import errno
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import Buffer
from pyslirp.stack.stack import Stack
from pyslirp.stack.tcp import CLOSED
from pyslirp.stack.timers import Timers
from pyslirp.wire import ethernet, ipv4, vnet
from pyslirp.wire.checksum import partial_sum, pseudo_header_sum
from tests.fuzz.seeds import Captured, captures, fix_checksums

#: A clock advance firing more timers than this is a timer storm (a hang in a real loop).
MAX_TIMER_RUNS = 20_000
#: One operation sending more frames than this is a storm too (4 MiB queue / 536 MSS ~ 8k).
MAX_FRAMES_PER_OP = 20_000
MAX_OPS = 400
#: Distinct counter names the stack may create (they name kinds of events, not inputs).
MAX_COUNTER_NAMES = 300
UPSTREAMS = [("127.0.0.1", 53), ("127.0.0.53", 5353)]
_ERRNOS = [errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT,
           errno.ECONNRESET, errno.EHOSTDOWN, errno.EPIPE]
#: Everything times out within this (TCP keepalive 600 + 4 * 30 s, UDP 240 s, ...).
_DRAIN_SECONDS = 3 * 3600.0

# Config byte bits.
CFG_NO_VNET = 1
CFG_NO_OFFLOAD = 2
CFG_SMALL_MTU = 4
CFG_NO_HOST_LOOPBACK = 8

# Opcodes and their arguments: "B" one byte, "H" two bytes, "D" a 2-byte length + data.
OPS: dict[str, str] = {
    "frame": "BD",          # flags (FRAME_*), the frame (with vnet header if the link has one)
    "advance": "H",         # centiseconds
    "flush": "",
    "tcp_connected": "B",   # flow index (0 = newest)
    "tcp_connect_failed": "BB",  # flow index, errno index
    "tcp_data": "BHD",      # flow index, extra zero bytes, data
    "tcp_eof": "B",
    "tcp_error": "BB",
    "tcp_writable": "B",
    "host_accept": "H",     # bytes each tcp_write accepts; 0xFFFF = everything
    "udp_datagram": "BBHD",  # flow index, source kind, source port, data
    "udp_error": "BBB",     # flow index, ICMP type, code
    "dns_reply": "BBD",     # flags (DNS_*), upstream index, data
    "dns_error": "BBB",     # upstream index, use the wire id of query index (0xFF: none), -
    "dns_failed": "B",      # query index
    "icmp_reply": "BHD",    # flow index, sequence, payload
    "icmp_error": "BHBB",   # flow index, sequence, type, code
    "tcp_forward": "HH",    # remote port, guest port: a port-forwarded connection
    "tcp_iss": "HH",        # the initial sequence number of the next TCP flow (high, low)
}
OPCODES = list(OPS)
FRAME_FIX_CHECKSUMS = 1
FRAME_FLUSH = 2
DNS_MATCH_ID = 1

Op = tuple[Any, ...]


class Violation(AssertionError):
    """The stack broke the HostPort contract or an invariant."""


# ---- encoding ------------------------------------------------------------------------

class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            self.pos += 1
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def blob(self) -> bytes:
        n = self.u16()
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def decode(data: bytes) -> tuple[int, list[Op]]:
    """The config byte and the operations of a program (every byte string is one)."""
    r = _Reader(data)
    config = r.u8()
    ops: list[Op] = []
    while r.left > 0 and len(ops) < MAX_OPS:
        name = OPCODES[r.u8() % len(OPCODES)]
        args: list[Any] = [name]
        for kind in OPS[name]:
            args.append(r.u8() if kind == "B" else r.u16() if kind == "H" else r.blob())
        ops.append(tuple(args))
    return config, ops


def encode(config: int, ops: Sequence[Op]) -> bytes:
    out = bytearray((config,))
    for op in ops:
        name, args = op[0], op[1:]
        out.append(OPCODES.index(name))
        for kind, value in zip(OPS[name], args, strict=True):
            if kind == "B":
                out.append(value & 0xFF)
            elif kind == "H":
                out += (value & 0xFFFF).to_bytes(2, "big")
            else:
                value = value[:0xFFFF]
                out += len(value).to_bytes(2, "big") + value
    return bytes(out)


# ---- the runtime's side ----------------------------------------------------------------

@dataclass
class _TcpSide:
    connected: bool = False
    reading: bool = True
    eof: bool = False
    want_writable: bool = False


@dataclass
class ModelHost:
    """HostPort with the runtime's rules; see the module docstring."""

    accept: int | None = None
    tcp: dict[Any, _TcpSide] = field(default_factory=dict)
    tcp_order: list[Any] = field(default_factory=list)
    tcp_closed: set[int] = field(default_factory=set)
    udp: list[Any] = field(default_factory=list)
    icmp: list[Any] = field(default_factory=list)
    dns_sent: list[tuple[Any, tuple[str, int], int]] = field(default_factory=list)
    calls: int = 0

    def _live_tcp(self, flow: Any, what: str) -> _TcpSide:
        self.calls += 1
        side = self.tcp.get(flow)
        if side is None:
            state = "closed" if id(flow) in self.tcp_closed else "unknown"
            raise Violation(f"{what} on a {state} TCP flow {flow!r}")
        return side

    def pick(self, flows: Sequence[Any], index: int) -> Any:
        """The ``index``-th newest of ``flows`` (wrapping around), None if there is none."""
        return flows[-1 - index % len(flows)] if flows else None

    def tcp_flows(self, connected: bool | None = None) -> list[Any]:
        return [f for f in self.tcp_order
                if connected is None or self.tcp[f].connected == connected]

    def forget_tcp(self, flow: Any) -> None:
        if self.tcp.pop(flow, None) is not None:
            self.tcp_order.remove(flow)
            self.tcp_closed.add(id(flow))

    # TCP
    def tcp_connect(self, flow: Any, targets: list[tuple[str, int]]) -> None:
        self.calls += 1
        if not targets:
            raise Violation(f"tcp_connect with no targets for {flow!r}")
        if flow in self.tcp:
            raise Violation(f"second tcp_connect for {flow!r}")
        self.tcp[flow] = _TcpSide()
        self.tcp_order.append(flow)

    def tcp_write(self, flow: Any, data: Buffer) -> int:
        side = self._live_tcp(flow, "tcp_write")
        if not side.connected:
            raise Violation(f"tcp_write before the connect finished on {flow!r}")
        n = len(data) if self.accept is None else min(self.accept, len(data))
        if n < len(data):
            side.want_writable = True
        return n

    def tcp_shutdown_write(self, flow: Any) -> None:
        self._live_tcp(flow, "tcp_shutdown_write")

    def tcp_pause_reading(self, flow: Any) -> None:
        self._live_tcp(flow, "tcp_pause_reading").reading = False

    def tcp_resume_reading(self, flow: Any) -> None:
        self._live_tcp(flow, "tcp_resume_reading").reading = True

    def tcp_close(self, flow: Any, reset: bool) -> None:
        self._live_tcp(flow, "tcp_close")
        self.forget_tcp(flow)

    # UDP
    def udp_open(self, flow: Any) -> bool:
        self.calls += 1
        self.udp.append(flow)
        return True

    def udp_send(self, flow: Any, dst: tuple[str, int], data: Any, segment: int = 0) -> None:
        self.calls += 1
        total = sum(len(part) for part in data) if segment else len(data)
        if segment and not 0 < segment < total:
            raise Violation(f"udp_send: segment {segment} for {total} bytes")
        if flow not in self.udp:
            raise Violation(f"udp_send on a closed UDP flow {flow!r}")

    def udp_close(self, flow: Any) -> None:
        self.calls += 1
        if flow in self.udp:
            self.udp.remove(flow)

    # ICMP
    def icmp_echo(self, flow: Any, dst: str, ident: int, seq: int, payload: Buffer) -> bool:
        self.calls += 1
        if flow not in self.icmp:
            self.icmp.append(flow)
        return True

    def icmp_close(self, flow: Any) -> None:
        self.calls += 1
        if flow in self.icmp:
            self.icmp.remove(flow)

    # DNS
    def dns_send(self, query: Any, upstream: tuple[str, int], data: Buffer) -> None:
        self.calls += 1
        if len(data) < 2:
            raise Violation(f"dns_send of {len(data)} bytes")
        self.dns_sent.append((query, upstream, data[0] << 8 | data[1]))
        del self.dns_sent[:-64]

    def dns_cancel(self, query: Any) -> None:
        self.calls += 1
        self.dns_sent = [s for s in self.dns_sent if s[0] is not query]

    def dns_release(self, upstream: tuple[str, int]) -> None:
        self.calls += 1


# ---- outgoing frames ----------------------------------------------------------------------

def check_frame(frame: bytes, with_vnet: bool, mtu: int) -> None:
    """A frame the stack sent to the guest must be well formed (see the module docstring)."""
    flags = gso = csum_start = csum_offset = 0
    if with_vnet:
        if len(frame) < vnet.HEADER_LEN:
            raise Violation(f"frame of {len(frame)} bytes has no vnet header")
        flags, gso, _hdr, _size, csum_start, csum_offset, _n = vnet.unpack(frame)
        frame = frame[vnet.HEADER_LEN:]
    eth = ethernet.EthernetFrame(memoryview(frame))
    if eth.ethertype != ethernet.ETHERTYPE_IPV4:
        if eth.ethertype != ethernet.ETHERTYPE_ARP or len(frame) != 42:
            raise Violation(f"unexpected frame to the guest: {frame[:64].hex()}")
        return
    ip = ipv4.Ipv4Packet(eth.payload)  # header checksum verified
    if ip.total_len != len(eth.payload):
        raise Violation(f"IPv4 total length {ip.total_len} != {len(eth.payload)} bytes sent")
    if gso == vnet.GSO_NONE and ip.total_len > mtu:
        raise Violation(f"a {ip.total_len}-byte IPv4 packet on a link with MTU {mtu}: "
                        f"{frame[:80].hex()}")
    if ip.is_fragment:
        return
    l4 = ip.payload
    if flags & vnet.F_NEEDS_CSUM:
        # The kernel finishes the sum from csum_start: only the pseudo-header is there.
        if csum_start != ethernet.HEADER_LEN + ip.header_len or csum_offset + 2 > len(l4):
            raise Violation(f"vnet csum_start {csum_start}/offset {csum_offset} off the L4 part")
        return
    if gso != vnet.GSO_NONE:
        raise Violation(f"GSO frame (type {gso}) without NEEDS_CSUM")
    proto = ip.proto
    initial = 0 if proto == ipv4.PROTO_ICMP else pseudo_header_sum(ip.src, ip.dst, proto, len(l4))
    if proto == ipv4.PROTO_UDP and len(l4) >= 8 and l4[6:8] == b"\0\0":
        return  # no UDP checksum (RFC 768)
    if proto in (ipv4.PROTO_TCP, ipv4.PROTO_UDP, ipv4.PROTO_ICMP) and partial_sum(l4, initial):
        raise Violation(f"bad L4 checksum in a frame to the guest: {frame[:80].hex()}")


class _Sink:
    def __init__(self, with_vnet: bool, mtu: int) -> None:
        self.with_vnet = with_vnet
        self.mtu = mtu
        self.count = 0

    def __call__(self, parts: Sequence[Buffer]) -> None:
        self.count += 1
        if self.count > MAX_FRAMES_PER_OP:
            raise Violation(f"more than {MAX_FRAMES_PER_OP} frames from one operation")
        check_frame(b"".join(bytes(p) for p in parts), self.with_vnet, self.mtu)


# ---- the run ------------------------------------------------------------------------------

class _IssSource(random.Random):
    """The TCP engine's ISS generator: seeded, or the value a ``tcp_iss`` op queued."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.next_iss: int | None = None

    def getrandbits(self, k: int) -> int:
        if self.next_iss is not None and k == 32:
            value, self.next_iss = self.next_iss, None
            return value
        return super().getrandbits(k)


class _CappedTimers(Timers):
    """Timers whose :meth:`run` fires at most MAX_TIMER_RUNS clients, then raises.

    A client that re-arms itself at a deadline that is already due would make the
    real :meth:`Timers.run` loop forever (the runtime's loop would spin); this copy of
    its loop turns that into a Violation. Keep it in step with ``Timers.run``.
    """

    def run(self, now: float) -> None:
        heap = self._heap
        fired = 0
        while heap and heap[0][0] <= now:
            deadline, _, client = heap[0]
            if client.timer_deadline == deadline:
                fired += 1
                if fired > MAX_TIMER_RUNS:
                    raise Violation(f"{client!r} re-armed at {deadline!r} <= now {now!r} "
                                    f"{MAX_TIMER_RUNS} times in one run_timers call")
                heapq.heappop(heap)
                client.timer_deadline = None
                client.on_timer(now)
            else:
                self._pop_stale()
            heap = self._heap


def make_stack(config_byte: int) -> tuple[Stack, ModelHost, _Sink]:
    config = NetConfig(vnet_hdr=not config_byte & CFG_NO_VNET,
                       offload=not config_byte & CFG_NO_OFFLOAD,
                       mtu=576 if config_byte & CFG_SMALL_MTU else 1500,
                       disable_host_loopback=bool(config_byte & CFG_NO_HOST_LOOPBACK),
                       dns_upstreams=list(UPSTREAMS))
    host = ModelHost()
    sink = _Sink(config.vnet_hdr, config.mtu)
    stack = Stack(config, sink, host)
    stack.timers.__class__ = _CappedTimers  # shared by every engine already
    stack.tcp.rng = _IssSource(config_byte)
    stack.dns.random_bytes = random.Random(config_byte + 1).randbytes
    return stack, host, sink


class Runner:
    """Runs one program; see the module docstring."""

    def __init__(self, config_byte: int) -> None:
        self.stack, self.host, self.sink = make_stack(config_byte)
        self.now = 1000.0

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        timers = self.stack.timers
        for _ in range(MAX_TIMER_RUNS):
            deadline = timers.next_deadline()
            if deadline is None or deadline > end:
                break
            self.now = max(self.now, deadline)
            self.stack.run_timers(self.now)
        else:
            raise Violation(f"more than {MAX_TIMER_RUNS} timer runs in {seconds} s")
        self.now = end

    def op(self, op: Op) -> None:
        self.sink.count = 0
        getattr(self, "_" + op[0])(*op[1:])
        check_invariants(self.stack, self.host)

    def _frame(self, flags: int, frame: bytes) -> None:
        if flags & FRAME_FIX_CHECKSUMS:
            off = vnet.HEADER_LEN if self.stack.config.vnet_hdr else 0
            frame = frame[:off] + fix_checksums(frame[off:])
        self.stack.receive_frame(memoryview(frame), self.now)
        if flags & FRAME_FLUSH:
            self.stack.flush(self.now)

    def _advance(self, centiseconds: int) -> None:
        self.advance(centiseconds / 100)

    def _flush(self) -> None:
        self.stack.flush(self.now)

    def _host_event(self) -> None:
        # The runtime flushes after every host callback (schedule_flush).
        self.stack.flush(self.now)

    def _tcp_connected(self, index: int) -> None:
        flow = self.host.pick(self.host.tcp_flows(connected=False), index)
        if flow is not None:
            self.host.tcp[flow].connected = True
            flow.host_connected(self.now)
            self._host_event()

    def _tcp_connect_failed(self, index: int, err: int) -> None:
        flow = self.host.pick(self.host.tcp_flows(connected=False), index)
        if flow is not None:
            self.host.forget_tcp(flow)  # the runtime released the socket
            flow.host_connect_failed(_ERRNOS[err % len(_ERRNOS)], self.now)
            self._host_event()

    def _readable(self, index: int) -> Any | None:
        flows = [f for f in self.host.tcp_flows(connected=True)
                 if self.host.tcp[f].reading and not self.host.tcp[f].eof]
        return self.host.pick(flows, index)

    def _tcp_data(self, index: int, extra: int, data: bytes) -> None:
        flow = self._readable(index)
        if flow is None:
            return
        budget = flow.host_read_budget()
        data = (data + bytes(extra * 16))[:budget]
        if data:
            flow.host_data(data, self.now)
        else:
            self.host.tcp[flow].reading = False  # what the runtime does at budget 0
        self._host_event()

    def _tcp_eof(self, index: int) -> None:
        flow = self._readable(index)
        if flow is not None:
            self.host.tcp[flow].eof = True
            self.host.tcp[flow].reading = False
            flow.host_eof(self.now)
            self._host_event()

    def _tcp_error(self, index: int, err: int) -> None:
        flow = self.host.pick(self.host.tcp_flows(connected=True), index)
        if flow is not None:
            self.host.tcp[flow].reading = False
            flow.host_error(_ERRNOS[err % len(_ERRNOS)], self.now)
            self._host_event()

    def _tcp_writable(self, index: int) -> None:
        flows = [f for f in self.host.tcp_order if self.host.tcp[f].want_writable]
        flow = self.host.pick(flows, index)
        if flow is not None:
            self.host.tcp[flow].want_writable = False
            flow.host_writable(self.now)
            self._host_event()

    def _host_accept(self, value: int) -> None:
        self.host.accept = None if value == 0xFFFF else value

    def _udp_datagram(self, index: int, source: int, port: int, data: bytes) -> None:
        flow = self.host.pick(self.host.udp, index)
        if flow is None:
            return
        targets = list(flow.targets.values()) or [("127.0.0.1", 7)]
        src_ip = (targets[source % len(targets)][0] if source < 128
                  else "127.0.0.1" if source < 192 else f"198.18.{source}.{port & 0xFF}")
        self.stack.udp.host_datagram(flow, src_ip, port, data, self.now)
        self._host_event()

    def _udp_error(self, index: int, icmp_type: int, code: int) -> None:
        flow = self.host.pick(self.host.udp, index)
        if flow is None:
            return
        targets = list(flow.targets.values()) or [("127.0.0.1", 7)]
        self.stack.udp.host_error(flow, targets[0], icmp_type, code, self.now)
        self._host_event()

    def _dns_reply(self, flags: int, upstream: int, data: bytes) -> None:
        target = UPSTREAMS[upstream % len(UPSTREAMS)]
        if flags & DNS_MATCH_ID and self.host.dns_sent:
            _query, target, wire_id = self.host.pick(self.host.dns_sent, upstream)
            data = wire_id.to_bytes(2, "big") + data[2:]
        self.stack.dns.upstream_datagram(target, data, self.now)
        self._host_event()

    def _dns_error(self, upstream: int, query_index: int, _unused: int) -> None:
        target = UPSTREAMS[upstream % len(UPSTREAMS)]
        wire_id = None
        if query_index != 0xFF and self.host.dns_sent:
            _query, target, wire_id = self.host.pick(self.host.dns_sent, query_index)
        self.stack.dns.upstream_error(target, self.now, wire_id)
        self._host_event()

    def _dns_failed(self, index: int) -> None:
        sent = self.host.pick(self.host.dns_sent, index)
        if sent is not None:
            self.stack.dns.upstream_failed(sent[0], self.now, sent[1])
            self._host_event()

    def _icmp_reply(self, index: int, seq: int, payload: bytes) -> None:
        flow = self.host.pick(self.host.icmp, index)
        if flow is not None:
            self.stack.icmp.host_echo_reply(flow, seq, payload, self.now)
            self._host_event()

    def _icmp_error(self, index: int, seq: int, icmp_type: int, code: int) -> None:
        flow = self.host.pick(self.host.icmp, index)
        if flow is not None:
            self.stack.icmp.host_echo_error(flow, seq, icmp_type, code, self.now)
            self._host_event()

    def _tcp_forward(self, remote_port: int, guest_port: int) -> None:
        config = self.stack.config
        guest = self.stack.guest_ip or config.guest_addr
        flow = self.stack.tcp.open_to_guest(config.gateway, remote_port, guest, guest_port,
                                            self.now, host_handle=object())
        if flow is not None:
            # Connected already; the runtime reads only after tcp_resume_reading.
            self.host.tcp[flow] = _TcpSide(connected=True, reading=False)
            self.host.tcp_order.append(flow)
        self._host_event()

    def _tcp_iss(self, high: int, low: int) -> None:
        rng = self.stack.tcp.rng
        assert isinstance(rng, _IssSource)
        rng.next_iss = high << 16 | low

    def drain(self) -> None:
        """End of the program: fail pending connects, let everything time out, check."""
        for flow in self.host.tcp_flows(connected=False):
            self.host.forget_tcp(flow)
            flow.host_connect_failed(errno.ETIMEDOUT, self.now)
        for flow in self.host.tcp_flows(connected=True):
            side = self.host.tcp[flow]
            if side.reading and not side.eof:
                side.eof = True
                flow.host_eof(self.now)
        self.host.accept = None
        for flow in self.host.tcp_flows(connected=True):
            if self.host.tcp[flow].want_writable:
                self.host.tcp[flow].want_writable = False
                flow.host_writable(self.now)
        self.stack.flush(self.now)
        self.sink.count = 0
        self.advance(_DRAIN_SECONDS)
        check_invariants(self.stack, self.host)
        check_drained(self.stack)
        self.stack.close_all(self.now)
        check_invariants(self.stack, self.host)


def check_invariants(stack: Stack, host: ModelHost) -> None:
    tcp = stack.tcp
    cfg = tcp.cfg
    if len(tcp.flows) > cfg.max_flows:
        raise Violation(f"{len(tcp.flows)} TCP flows > max_flows {cfg.max_flows}")
    # The guest's own flows and inbound (port-forwarded) ones are limited apart.
    half_open = sum(1 for f in tcp.flows.values() if f.half_open and not f.inbound)
    if not 0 <= tcp.half_open == half_open <= cfg.max_half_open:
        raise Violation(f"half_open count {tcp.half_open}, {half_open} flows half open")
    inbound = sum(1 for f in tcp.flows.values() if f.half_open and f.inbound)
    if not 0 <= tcp.inbound_half_open == inbound <= cfg.max_inbound_half_open:
        raise Violation(f"inbound half_open count {tcp.inbound_half_open}, {inbound} flows")
    for flow in tcp.flows.values():
        if flow.state == CLOSED:
            raise Violation(f"CLOSED flow {flow!r} still in the table")
        if not 0 <= flow.backlog_len <= cfg.rcv_buf or len(flow.ooo) > cfg.max_ooo_segments:
            raise Violation(f"{flow!r}: backlog {flow.backlog_len}, {len(flow.ooo)} ooo segments")
        if flow.ooo_len > cfg.rcv_buf or flow.send_queue_len > cfg.snd_buf:
            raise Violation(f"{flow!r}: ooo {flow.ooo_len} bytes, send queue "
                            f"{flow.send_queue_len} bytes")
    if any(key not in tcp.flows for key in tcp.time_wait):
        raise Violation("a TIME_WAIT entry without a flow")
    if len(stack.udp.flows) > stack.udp.max_flows or len(stack.icmp.flows) > stack.icmp.max_flows:
        raise Violation(f"{len(stack.udp.flows)} UDP / {len(stack.icmp.flows)} ICMP flows")
    for uflow in stack.udp.flows.values():
        if len(uflow.targets) > 256 or len(uflow.origins) > 256:
            raise Violation(f"{uflow!r}: {len(uflow.targets)} targets, "
                            f"{len(uflow.origins)} origins")
    if len(stack.dns.pending) > stack.dns.max_pending:
        raise Violation(f"{len(stack.dns.pending)} DNS queries pending")
    if len(stack.frag) > stack.frag.max_packets:
        raise Violation(f"{len(stack.frag)} packets in reassembly")
    live = (len(tcp.flows) + len(stack.udp.flows) + len(stack.icmp.flows) + 8)
    if len(stack.timers) > 2 * live + 256 + 16:
        raise Violation(f"{len(stack.timers)} timer entries for {live} live clients")
    if len(stack.link.counters) > MAX_COUNTER_NAMES:
        raise Violation(f"{len(stack.link.counters)} counter names")


def check_drained(stack: Stack) -> None:
    """After every timeout: no flow, no query, no fragment, no timer is left."""
    left = {"tcp": len(stack.tcp.flows), "udp": len(stack.udp.flows),
            "icmp": len(stack.icmp.flows), "dns": len(stack.dns.pending),
            "frag": len(stack.frag)}
    if any(left.values()) or stack.timers.next_deadline() is not None:
        flows = [repr(f) + " " + f.state for f in stack.tcp.flows.values()][:4]
        raise Violation(f"left after {_DRAIN_SECONDS:.0f} s idle: {left}, "
                        f"timer at {stack.timers.next_deadline()}, {flows}")


def run_program(config_byte: int, ops: Sequence[Op]) -> Runner:
    runner = Runner(config_byte)
    for op in ops[:MAX_OPS]:
        runner.op(op)
    runner.drain()
    return runner


def fuzz_stack(data: bytes) -> None:
    """The atheris/hypothesis entry point: any bytes are a program."""
    config, ops = decode(data)
    run_program(config, ops)


# ---- seeds: programs from the captures ----------------------------------------------------

def _host_events_for(frame: bytes, state: dict[bytes, Any]) -> list[Op]:
    """The host events that made the stack send ``frame`` (a stack->guest capture)."""
    ip = frame[14:]
    if frame[12:14] != b"\x08\x00" or len(ip) < 20:
        return []
    ihl = (ip[0] & 0x0F) * 4
    proto, flags_frag = ip[9], int.from_bytes(ip[6:8], "big")
    if flags_frag & 0x3FFF:
        # A fragment of a reply: the host event carries the whole datagram.
        parts = state.setdefault(ip[4:6], [])
        parts.append((flags_frag & 0x1FFF, bytes(ip[ihl:int.from_bytes(ip[2:4], "big")])))
        if flags_frag & 0x2000:
            return []
        l4 = b"".join(p for _, p in sorted(parts))
    else:
        l4 = bytes(ip[ihl:int.from_bytes(ip[2:4], "big")])
    if proto == 6 and len(l4) >= 20:
        tflags = l4[13]
        data = l4[(l4[12] >> 4) * 4:]
        if tflags & 0x12 == 0x12:
            return [("tcp_connected", 0)]
        out: list[Op] = [("tcp_data", 0, 0, data)] if data else []
        if tflags & 0x01:
            out.append(("tcp_eof", 0))
        if tflags & 0x04:
            out.append(("tcp_connect_failed", 0, 0))
        return out
    if proto == 17 and len(l4) >= 8:
        sport = int.from_bytes(l4[0:2], "big")
        if sport == 53:
            return [("dns_reply", DNS_MATCH_ID, 0, l4[8:])]
        if sport == 67:
            return []
        return [("udp_datagram", 0, 0, sport, l4[8:])]
    if proto == 1 and len(l4) >= 8 and l4[0] == 0:
        return [("icmp_reply", 0, int.from_bytes(l4[6:8], "big"), l4[8:])]
    return []


def _tcp_ports(frame: bytes) -> tuple[int, int, int, int] | None:
    """(source port, destination port, flags, seq) of a TCP/IPv4 frame, else None."""
    if frame[12:14] != b"\x08\x00" or len(frame) < 54 or frame[23] != 6:
        return None
    l4 = frame[14 + (frame[14] & 0x0F) * 4:]
    if len(l4) < 20:
        return None
    return (int.from_bytes(l4[0:2], "big"), int.from_bytes(l4[2:4], "big"), l4[13],
            int.from_bytes(l4[4:8], "big"))


def _captured_iss(frames: Sequence[Captured]) -> dict[int, int]:
    """The ISS our SYN-ACK had in the capture, by guest port (to replay the handshake)."""
    found = {}
    for captured in frames:
        tcp = _tcp_ports(captured.frame)
        if tcp is not None and not captured.from_guest and tcp[2] & 0x12 == 0x12:
            found[tcp[1]] = tcp[3]
    return found


def program_from_capture(frames: Sequence[Captured]) -> tuple[int, list[Op]]:
    """A program replaying a capture: guest frames in, the host events behind our replies."""
    ops: list[Op] = []
    state: dict[bytes, Any] = {}
    iss = _captured_iss(frames)
    last = frames[0].time if frames else 0.0
    for captured in frames:
        gap = int((captured.time - last) * 100)
        if gap > 0:
            ops.append(("advance", min(gap, 0xFFFF)))
        last = captured.time
        if captured.from_guest:
            tcp = _tcp_ports(captured.frame)
            if tcp is not None and tcp[2] & 0x12 == 0x02 and tcp[0] in iss:
                ops.append(("tcp_iss", iss[tcp[0]] >> 16, iss[tcp[0]] & 0xFFFF))
            flags = vnet.F_DATA_VALID
            ops.append(("frame", FRAME_FIX_CHECKSUMS | FRAME_FLUSH,
                        vnet.build(flags) + captured.frame))
        else:
            ops.extend(_host_events_for(captured.frame, state))
    return 0, ops


def _without_vnet(ops: list[Op]) -> list[Op]:
    return [(op[0], op[1], op[2][vnet.HEADER_LEN:]) if op[0] == "frame" else op for op in ops]


_GATEWAY = bytes((10, 0, 2, 2))
_REMOTE = bytes((198, 18, 0, 1))


def _to_remote(frames: Sequence[Captured]) -> list[Captured]:
    """The capture as if the guest had talked to 198.18.0.1 instead of the gateway
    (the captures only reach the host's loopback; the NAT path is the other one)."""
    out = []
    for c in frames:
        frame = bytearray(c.frame)
        if frame[12:14] == b"\x08\x00" and len(frame) >= 34:
            for pos in (26, 30):
                if frame[pos:pos + 4] == _GATEWAY:
                    frame[pos:pos + 4] = _REMOTE
        out.append(Captured(c.time, c.from_guest, fix_checksums(frame)))
    return out


def stack_seeds() -> list[bytes]:
    """One encoded program per capture, and variants without offloads, without vnet, and
    toward a remote address instead of the gateway."""
    out = []
    flows = list(captures().values())
    flows += [_to_remote(captures()[name]) for name in ("icmp", "tcp", "udp")]
    for frames in flows:
        config, ops = program_from_capture(frames)
        out.append(encode(config, ops))
        out.append(encode(config | CFG_NO_OFFLOAD, ops))
        out.append(encode(config | CFG_NO_VNET, _without_vnet(ops)))
    return out
