"""TCP engine: scripted exchanges between a fake guest and a fake host, on a fake clock."""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyslirp.stack.config import NetConfig
from pyslirp.stack.tcp import (
    CLOSE_WAIT,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    LAST_ACK,
    SYN_RCVD,
    TIME_WAIT,
    TcpConfig,
    TcpEngine,
    TcpFlow,
)
from pyslirp.stack.tcpstate import IllegalTransition
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp, ipv4, vnet
from pyslirp.wire import tcp as wtcp
from pyslirp.wire.checksum import partial_sum, pseudo_header_sum
from pyslirp.wire.ipv4 import Ipv4Packet
from tests.stack.fakes import GUEST_MAC, FakeClock, FakeHost, make_link

GUEST = bytes([10, 0, 2, 100])
REMOTE = bytes([93, 184, 216, 34])
S, A, F, R, P = wtcp.SYN, wtcp.ACK, wtcp.FIN, wtcp.RST, wtcp.PSH
M = 0xFFFFFFFF


@dataclass
class Out:
    """One frame the engine sent, parsed back."""

    raw: bytes
    vnet: tuple[int, ...] | None
    ip: Ipv4Packet
    tcp: wtcp.TcpSegment | None

    @property
    def flags(self) -> int:
        assert self.tcp is not None
        return self.tcp.flags

    @property
    def seq(self) -> int:
        assert self.tcp is not None
        return self.tcp.seq

    @property
    def ack(self) -> int:
        assert self.tcp is not None
        return self.tcp.ack

    @property
    def data(self) -> bytes:
        assert self.tcp is not None
        return bytes(self.tcp.payload)


class Harness:
    def __init__(self, offload: bool = True, vnet_hdr: bool = True, mtu: int = 1500,
                 cfg: TcpConfig | None = None, policy: Any = None) -> None:
        self.config = NetConfig(mtu=mtu, vnet_hdr=vnet_hdr, offload=offload)
        self.link, self.sink = make_link(self.config)
        self.host = FakeHost()
        self.timers = Timers()
        self.clock = FakeClock(self.timers)
        self.engine = TcpEngine(
            self.config, self.link, self.host, self.timers,
            policy or (lambda ip, port: [("127.0.0.1", port)]), cfg, rng=random.Random(7))
        self.gseq = 1_000_000  # the guest's next sequence number
        self.sport = 40000

    # -- guest -> engine
    def send(self, flags: int, seq: int | None = None, ack: int = 0, data: bytes = b"",
             window: int = 502, options: bytes = b"", sport: int | None = None,
             dport: int = 80, flush: bool = True) -> None:
        sport = self.sport if sport is None else sport
        seq = self.gseq if seq is None else seq
        seg = wtcp.build(GUEST, REMOTE, sport, dport, seq, ack, flags, window, data, options)
        head = bytearray(20)
        ipv4.build_header(head, 0, GUEST, REMOTE, 6, len(seg))
        pkt = Ipv4Packet(memoryview(bytes(head) + bytes(seg)))
        self.engine.handle(pkt, self.clock.now, checksum_verified=False)
        if flush:
            self.engine.flush(self.clock.now)

    def feed(self, flow: TcpFlow, data: bytes) -> None:
        """Host data for ``flow`` as the runtime delivers it: a read, then a flush."""
        flow.host_data(data, self.clock.now)
        self.engine.flush(self.clock.now)

    # -- engine -> guest
    def out(self) -> list[Out]:
        res = []
        for raw in self.sink.take():
            res.append(parse(raw, self.config.vnet_hdr))
        return res

    def expect_one(self) -> Out:
        outs = self.out()
        assert len(outs) == 1, outs
        return outs[0]

    # -- scripted handshake
    def connect(self, wscale: int | None = 7, mss: int = 1460, window: int = 502,
                sport: int | None = None, sack: bool = False) -> tuple[TcpFlow, int]:
        """Guest SYN, host connects, SYN-ACK, guest ACK. Returns (flow, our next seq)."""
        if sport is not None:
            self.sport = sport
        self.send(S, options=wtcp.syn_options(mss=mss, wscale=wscale, sack_permitted=sack),
                  window=64240)
        call = self.host.last("tcp_connect")
        assert call is not None
        flow = call[1]
        assert self.out() == []
        flow.host_connected(self.clock.now)
        synack = self.expect_one()
        assert synack.flags == S | A and synack.ack == self.gseq + 1
        self.gseq += 1
        self.send(A, ack=synack.seq + 1, window=window)
        assert flow.state == ESTABLISHED
        self.out()
        return flow, (synack.seq + 1) & M


def parse(raw: bytes, vnet_hdr: bool) -> Out:
    off = vnet.HEADER_LEN if vnet_hdr else 0
    vh = vnet.unpack(raw) if vnet_hdr else None
    assert raw[off + 12:off + 14] == b"\x08\x00"
    assert raw[off:off + 6] == GUEST_MAC
    ip = Ipv4Packet(memoryview(raw)[off + 14:])  # verifies the IP header checksum
    seg = None
    if ip.proto == 6:
        seg = wtcp.TcpSegment(ip.payload)
        ph = pseudo_header_sum(ip.src, ip.dst, 6, len(ip.payload))
        if vh is not None and vh[0] & vnet.F_NEEDS_CSUM:
            # Partial checksum: the field holds the pseudo-header sum only.
            assert vh[4:6] == (34, 16)
            assert seg.csum % 0xFFFF == ph % 0xFFFF
        else:
            assert partial_sum(ip.payload, ph) == 0, "bad TCP checksum"
    return Out(raw, vh, ip, seg)


# ---------------------------------------------------------------- handshake

def test_handshake_negotiates_mss_and_window_scale() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1400, wscale=7), window=64240)
    name, flow, targets = h.host.calls[0]
    assert name == "tcp_connect" and targets == [("127.0.0.1", 80)]
    assert (flow.guest_port, flow.remote_addr, flow.remote_port) == (40000, REMOTE, 80)
    assert h.out() == []  # nothing is answered before the host side is known
    h.send(S, options=wtcp.syn_options(mss=1400, wscale=7), window=64240)  # guest resends
    assert h.out() == [] and len(h.engine) == 1
    flow.host_connected(h.clock.now)
    synack = h.expect_one()
    o = synack.tcp.options() if synack.tcp else None
    assert synack.flags == S | A and synack.ack == h.gseq + 1
    assert o is not None and o.mss == 1460 and o.wscale == 7
    assert flow.state == SYN_RCVD and h.engine.half_open == 1
    h.send(A, seq=h.gseq + 1, ack=synack.seq + 1)
    assert flow.state == ESTABLISHED and h.engine.half_open == 0
    assert flow.mss == 1400


def test_a_flow_refuses_a_state_change_its_table_does_not_allow() -> None:
    h = Harness()
    flow, _ = h.connect()
    with pytest.raises(IllegalTransition, match="ESTABLISHED cannot go to SYN_RCVD"):
        flow._to(SYN_RCVD)
    assert flow.state == ESTABLISHED


def test_no_window_scale_when_guest_does_not_offer_it() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460), window=64240)
    flow = h.host.calls[0][1]
    flow.host_connected(h.clock.now)
    synack = h.expect_one()
    assert synack.tcp is not None and synack.tcp.options().wscale is None
    h.send(A, seq=h.gseq + 1, ack=synack.seq + 1)
    h.feed(flow, b"x")
    assert h.expect_one().tcp.window <= 0xFFFF  # type: ignore[union-attr]


def test_lost_synack_is_resent_on_duplicate_syn_and_on_timeout() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460, wscale=7))
    flow = h.host.calls[0][1]
    flow.host_connected(h.clock.now)
    first = h.expect_one()
    h.send(S, options=wtcp.syn_options(mss=1460, wscale=7))
    assert h.expect_one().seq == first.seq
    h.clock.advance(1.5)
    again = h.out()
    assert again and all(o.flags == S | A and o.seq == first.seq for o in again)


# ---------------------------------------------------------------- data both ways

def test_guest_data_goes_to_host_with_one_coalesced_ack_per_batch() -> None:
    h = Harness()
    flow, ours = h.connect()
    for chunk in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
        h.send(A | P, ack=ours, data=chunk, flush=False)
        h.gseq += len(chunk)
    assert h.out() == []  # ACKs wait for the end of the batch
    h.engine.flush(h.clock.now)
    ack = h.expect_one()
    assert ack.flags == A and ack.ack == h.gseq
    assert bytes(h.host.written[flow]) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_guest_super_frame_is_written_whole() -> None:
    h = Harness()
    flow, ours = h.connect()
    big = bytes(range(256)) * 256  # 64 KiB, as a TSO super-frame from the guest
    h.send(A, ack=ours, data=big[:60000])
    assert bytes(h.host.written[flow]) == big[:60000]
    assert h.expect_one().ack == h.gseq + 60000


def test_host_data_goes_out_as_gso_super_frames() -> None:
    h = Harness()
    flow, ours = h.connect(window=2000)  # 2000 << 7 = 256000 bytes
    data = random.Random(1).randbytes(200_000)
    h.feed(flow, data)
    outs = h.out()
    got = b""
    acked = ours
    for _ in range(20):
        for o in outs:
            assert o.vnet is not None
            flags, gso_type, hdr_len, gso_size, cstart, coff, _ = o.vnet
            assert flags == vnet.F_NEEDS_CSUM and (cstart, coff) == (34, 16)
            assert hdr_len == 14 + 20 + 20
            assert o.ip.total_len <= 65535
            if len(o.data) > 1460:
                assert gso_type == vnet.GSO_TCPV4 and gso_size == 1460
            else:
                assert gso_type == vnet.GSO_NONE
            assert o.seq == (ours + len(got)) & M
            got += o.data
            acked = (o.seq + len(o.data)) & M
        if len(got) == len(data):
            break
        h.send(A, ack=acked, window=2000)
        outs = h.out()
    assert got == data
    assert flow.send_queue_len > 0  # the last burst is not acknowledged yet
    h.send(A, ack=acked, window=2000)
    assert flow.send_queue_len == 0


def test_without_offload_frames_are_mss_sized_with_full_checksums() -> None:
    h = Harness(offload=False, vnet_hdr=False)
    flow, ours = h.connect(mss=1000)
    data = random.Random(2).randbytes(9000)
    h.feed(flow, data)
    outs = h.out()  # parse() verifies every checksum
    assert all(len(o.data) <= 1000 for o in outs)
    assert b"".join(o.data for o in outs) == data
    assert outs[-1].flags & P


def test_vnet_without_offload_sends_plain_vnet_headers() -> None:
    h = Harness(offload=False, vnet_hdr=True)
    flow, _ = h.connect()
    h.feed(flow, b"z" * 5000)
    outs = h.out()
    assert all(o.vnet == (0, 0, 0, 0, 0, 0, 0) for o in outs)
    assert all(len(o.data) <= 1460 for o in outs)


# ---------------------------------------------------------------- loss, reordering, duplicates

def test_reordered_guest_segments_are_reassembled_and_dup_acked() -> None:
    h = Harness()
    flow, ours = h.connect()
    a, b, c = b"a" * 100, b"b" * 100, b"c" * 100
    h.send(A, seq=h.gseq + 200, ack=ours, data=c)
    dup = h.expect_one()
    assert dup.ack == h.gseq  # immediate duplicate ACK for the hole
    h.send(A, seq=h.gseq + 100, ack=ours, data=b)
    assert h.expect_one().ack == h.gseq
    assert bytes(h.host.written[flow]) == b""
    h.send(A, seq=h.gseq, ack=ours, data=a)
    assert bytes(h.host.written[flow]) == a + b + c
    assert h.expect_one().ack == h.gseq + 300


def test_sack_is_negotiated_and_held_data_is_reported() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460, wscale=7, sack_permitted=True))
    flow = h.host.calls[0][1]
    flow.host_connected(h.clock.now)
    synack = h.expect_one()
    assert synack.tcp is not None and synack.tcp.options().sack_permitted
    h.gseq += 1
    h.send(A, ack=synack.seq + 1)
    h.out()
    h.send(A, seq=h.gseq + 100, ack=synack.seq + 1, data=b"b" * 100)
    h.send(A, seq=h.gseq + 300, ack=synack.seq + 1, data=b"d" * 100)
    outs = h.out()
    assert outs[-1].ack == h.gseq
    assert outs[-1].tcp is not None and outs[-1].tcp.options().sack == [
        (h.gseq + 300, h.gseq + 400), (h.gseq + 100, h.gseq + 200)]


def test_sack_blocks_point_fast_retransmit_at_the_hole() -> None:
    h = Harness()
    flow, ours = h.connect(window=4000, sack=True)
    flow.cwnd = 1 << 20
    data = random.Random(4).randbytes(5 * 64240)
    h.feed(flow, data)
    assert len(h.out()) == 5
    # 3000 bytes at the head were lost; the guest holds the rest, and its reader
    # keeps opening the window, so the window differs in every duplicate ACK.
    for i, win in enumerate((4000, 4100, 4200)):
        h.send(A, ack=ours, window=win,
               options=wtcp.sack_option([(ours + 3000, ours + 64240 * (i + 2))]))
    (rtx,) = h.out()
    assert rtx.seq == ours and rtx.data == data[:3000]


def test_duplicate_guest_segments_are_delivered_once() -> None:
    h = Harness()
    flow, ours = h.connect()
    h.send(A, ack=ours, data=b"hello")
    h.send(A, ack=ours, data=b"hello")  # retransmission
    h.send(A, seq=h.gseq + 2, ack=ours, data=b"llo world")  # overlapping
    assert bytes(h.host.written[flow]) == b"hello world"
    acks = h.out()
    assert acks and acks[-1].ack == h.gseq + 11


def test_retransmission_with_exponential_backoff_then_give_up() -> None:
    cfg = TcpConfig(max_retries=4)
    h = Harness(cfg=cfg)
    flow, ours = h.connect()
    h.feed(flow, b"lost")
    first = h.expect_one()
    times = []
    start = h.clock.now
    for _ in range(200):
        h.clock.advance(0.05)
        for o in h.out():
            if o.flags & R:
                times.append(("rst", h.clock.now - start))
            else:
                assert o.seq == first.seq and o.data == b"lost"
                times.append(("rtx", h.clock.now - start))
    kinds = [k for k, _ in times]
    # One small segment in flight may see a delayed ACK: no tail loss probe,
    # just max_retries timeouts, then the reset.
    assert kinds == ["rtx"] * 4 + ["rst"]
    assert h.link.counters["tcp.tlp"] == 0 and h.link.counters["tcp.rto"] == 4
    gaps = [t2 - t1 for (_, t1), (_, t2) in zip(times, times[1:], strict=False)]
    assert all(g2 > g1 * 1.5 for g1, g2 in zip(gaps, gaps[1:], strict=False))
    assert h.host.closed[flow] is True and len(h.engine) == 0


def test_tail_loss_probe_elicits_the_ack_a_lagging_guest_would_delay() -> None:
    h = Harness()
    flow, ours = h.connect()
    h.feed(flow, b"x" * 3000)
    h.out()
    h.send(A, ack=ours + 1000)  # an RTT sample; then the guest goes quiet
    h.out()
    h.clock.advance(0.05)  # far less than the 200 ms minimum RTO
    (probe,) = h.out()
    assert probe.seq == ours + 3000 - 1460 and len(probe.data) == 1460
    h.send(A, ack=ours + 3000)  # the probe's ACK shows nothing was lost
    h.clock.advance(5)
    assert h.out() == [] and h.link.counters["tcp.rto"] == 0


def test_three_duplicate_acks_trigger_fast_retransmit() -> None:
    h = Harness(offload=False, vnet_hdr=False)
    flow, ours = h.connect()
    h.feed(flow, bytes(1460 * 6))
    h.out()
    h.send(A, ack=ours + 1460)
    for _ in range(2):
        h.send(A, ack=ours + 1460)  # segment 2 was lost
    assert h.out() == []
    h.send(A, ack=ours + 1460)  # the third duplicate
    rtx = h.out()
    assert len(rtx) == 1 and rtx[0].seq == ours + 1460 and len(rtx[0].data) == 1460
    assert h.link.counters["tcp.fast_retransmit"] == 1


def test_one_duplicate_ack_recovers_a_lost_gso_frame() -> None:
    h = Harness()
    flow, ours = h.connect(window=4000)
    flow.cwnd = 1 << 20  # past slow start
    data = random.Random(3).randbytes(3 * 64240)
    h.feed(flow, data)
    frames = h.out()
    assert len(frames) == 3
    # The first super-frame is lost; the guest says so once per frame that arrived.
    h.send(A, ack=ours, window=4000)
    assert h.out() == []
    h.send(A, ack=ours, window=4000)
    (rtx,) = h.out()
    assert rtx.seq == ours and rtx.data == data[:64240]
    assert rtx.vnet is not None and rtx.vnet[1] == vnet.GSO_TCPV4


def test_go_back_n_after_timeout_resends_everything_unacked() -> None:
    h = Harness(offload=False, vnet_hdr=False)
    flow, ours = h.connect()
    data = bytes(range(256)) * 20
    h.feed(flow, data)
    h.out()
    h.clock.advance(5)
    got = b""
    for _ in range(50):
        outs = h.out()
        for o in outs:
            if o.seq == (ours + len(got)) & M:
                got += o.data
        if len(got) >= len(data):
            break
        h.send(A, ack=(ours + len(got)) & M)
    assert got == data


# ---------------------------------------------------------------- windows and backpressure

def test_zero_window_is_probed_and_data_flows_when_it_opens() -> None:
    h = Harness()
    flow, ours = h.connect(window=0)
    h.feed(flow, b"waiting")
    assert h.out() == []
    h.clock.advance(0.5)
    probes = h.out()
    assert probes and all(not p.data and p.seq == ours - 1 for p in probes)
    h.send(A, ack=ours, window=0)  # still closed; the guest answered
    h.clock.advance(30)
    assert len(h.engine) == 1  # answered probes never give up
    h.out()
    h.send(A, ack=ours, window=100)
    (o,) = [o for o in h.out() if o.data]
    assert o.data == b"waiting"


def test_host_that_never_reads_closes_the_window_and_bounds_memory() -> None:
    cfg = TcpConfig(rcv_buf=64 * 1024)
    h = Harness(cfg=cfg)
    h.host.accept = 0
    flow, ours = h.connect()
    sent = 0
    last_window = None
    for _ in range(200):  # a guest that ignores our window entirely
        h.send(A, seq=h.gseq + sent, ack=ours, data=b"x" * 1460)
        sent += 1460
        for o in h.out():
            assert o.tcp is not None
            last_window = o.tcp.window
    assert flow.backlog_len <= 64 * 1024 + 1460
    assert last_window == 0
    # The host starts reading: the guest hears of the open window at once.
    h.host.accept = None
    flow.host_writable(h.clock.now)
    upd = h.expect_one()
    assert upd.tcp is not None and upd.tcp.window > 0
    assert len(h.host.written[flow]) == flow.rcv_nxt - (h.gseq & M)


def test_partial_host_writes_keep_order() -> None:
    h = Harness()
    h.host.accept = 3
    flow, ours = h.connect()
    h.send(A, ack=ours, data=b"abcdefgh")
    h.send(A, seq=h.gseq + 8, ack=ours, data=b"ijkl")
    assert bytes(h.host.written[flow]) == b"abc"
    for _ in range(5):
        flow.host_writable(h.clock.now)
    assert bytes(h.host.written[flow]) == b"abcdefghijkl"


def test_full_guest_window_pauses_host_reading_and_acks_resume_it() -> None:
    cfg = TcpConfig(snd_buf=100_000)
    h = Harness(cfg=cfg)
    flow, ours = h.connect(window=100)  # 12800 bytes
    h.feed(flow, bytes(60_000))
    assert flow.host_read_budget() == 40_000
    h.feed(flow, bytes(40_000))
    assert flow in h.host.paused and flow.host_read_budget() == 0
    acked = ours
    while flow in h.host.paused:
        outs = h.out()
        assert outs, "the flow stalled"
        acked = max((o.seq + len(o.data)) & M for o in outs)
        h.send(A, ack=acked, window=100)
    # Reading resumes once half the queue is acknowledged.
    assert 50_000 <= flow.host_read_budget() < 65_000


# ---------------------------------------------------------------- resets

def test_guest_rst_resets_host_socket() -> None:
    h = Harness()
    flow, ours = h.connect()
    h.send(R, seq=h.gseq + 10)  # in window but not exact: challenge ACK only
    assert h.expect_one().flags == A and len(h.engine) == 1
    h.send(R, seq=h.gseq)
    assert h.host.closed[flow] is True and len(h.engine) == 0


def test_host_error_resets_guest() -> None:
    h = Harness()
    flow, ours = h.connect()
    flow.host_error(errno.ECONNRESET, h.clock.now)
    rst = h.expect_one()
    assert rst.flags & R and rst.seq == ours
    assert len(h.engine) == 0


def test_segment_for_unknown_flow_gets_rst() -> None:
    h = Harness()
    h.send(A, seq=5, ack=1234, data=b"stale")
    rst = h.expect_one()
    assert rst.flags == R and rst.seq == 1234


def test_connection_refused_becomes_rst() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460))
    flow = h.host.calls[0][1]
    flow.host_connect_failed(errno.ECONNREFUSED, h.clock.now)
    rst = h.expect_one()
    assert rst.flags == R | A and rst.ack == h.gseq + 1
    assert len(h.engine) == 0 and h.engine.half_open == 0


@pytest.mark.parametrize(("err", "code"), [(errno.ENETUNREACH, icmp.NET_UNREACH),
                                           (errno.EHOSTUNREACH, icmp.HOST_UNREACH),
                                           (errno.ETIMEDOUT, icmp.HOST_UNREACH)])
def test_unreachable_becomes_icmp_quoting_the_syn(err: int, code: int) -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460))
    h.host.calls[0][1].host_connect_failed(err, h.clock.now)
    o = h.expect_one()
    assert o.ip.proto == icmp.PROTO and o.ip.dst == GUEST
    msg = icmp.IcmpMessage(o.ip.payload)
    assert (msg.type, msg.code) == (icmp.DEST_UNREACH, code)
    quoted = bytes(msg.payload)
    assert len(quoted) == 28 and quoted[9] == 6
    assert quoted[12:16] == GUEST and quoted[16:20] == REMOTE
    assert int.from_bytes(quoted[20:22], "big") == 40000
    assert int.from_bytes(quoted[24:28], "big") == h.gseq  # the SYN's sequence number
    assert len(h.engine) == 0


def test_policy_refusal_is_icmp_net_unreachable() -> None:
    h = Harness(policy=lambda ip, port: None)
    h.send(S)
    o = h.expect_one()
    msg = icmp.IcmpMessage(o.ip.payload)
    assert (msg.type, msg.code) == (icmp.DEST_UNREACH, icmp.NET_UNREACH)
    assert h.host.calls == []


def test_syn_flood_is_bounded() -> None:
    h = Harness(cfg=TcpConfig(max_half_open=4, max_flows=6))
    for port in range(1000, 1010):
        h.send(S, sport=port)
    assert len(h.host.calls) == 4 and len(h.engine) == 4
    assert h.link.counters["tcp.drop.max_half_open"] == 6


# ---------------------------------------------------------------- closing

def test_guest_half_close_then_host_finishes() -> None:
    h = Harness()
    flow, ours = h.connect()
    h.send(A | F, ack=ours, data=b"request")
    assert bytes(h.host.written[flow]) == b"request" and flow in h.host.shut
    assert flow.state == CLOSE_WAIT and h.expect_one().ack == h.gseq + 8
    h.gseq += 8
    h.feed(flow, b"response")  # host keeps talking after our half-close
    flow.host_eof(h.clock.now)
    outs = h.out()
    assert b"".join(o.data for o in outs) == b"response" and outs[-1].flags & F
    assert flow.state == LAST_ACK
    h.send(A, ack=ours + 9)
    assert h.host.closed[flow] is False and len(h.engine) == 0


def test_closed_connections_do_not_pile_up_in_the_timer_heap() -> None:
    # Each connection leaves a keepalive deadline 10 minutes out; under churn the
    # shared heap (which holds the flow objects) must stay small all the same.
    h = Harness()
    for i in range(3000):
        flow, ours = h.connect(sport=20000 + i)
        h.send(A | F, ack=ours)
        flow.host_eof(h.clock.now)
        h.engine.flush(h.clock.now)
        h.gseq += 1
        h.send(A, ack=ours + 1)
        h.out()
        h.host.calls.clear()
    assert len(h.engine) == 0
    assert len(h.timers) < 1000


def test_host_half_close_then_guest_keeps_sending() -> None:
    h = Harness(cfg=TcpConfig(time_wait=2.0))
    flow, ours = h.connect()
    flow.host_eof(h.clock.now)
    fin = h.expect_one()
    assert fin.flags & F and flow.state == FIN_WAIT_1
    h.send(A, ack=ours + 1)
    assert flow.state == FIN_WAIT_2
    h.send(A, ack=ours + 1, data=b"more")
    assert bytes(h.host.written[flow]) == b"more"
    h.out()
    h.send(A | F, seq=h.gseq + 4, ack=ours + 1)
    assert flow.state == TIME_WAIT and h.host.closed[flow] is False
    assert h.expect_one().ack == h.gseq + 5
    h.send(A | F, seq=h.gseq + 4, ack=ours + 1)  # retransmitted FIN is re-ACKed
    assert h.expect_one().ack == h.gseq + 5
    h.clock.advance(3)
    assert len(h.engine) == 0


def test_simultaneous_close() -> None:
    h = Harness()
    flow, ours = h.connect()
    flow.host_eof(h.clock.now)
    assert h.expect_one().flags & F
    h.send(A | F, ack=ours)  # the guest's FIN crossed ours
    assert flow.state == CLOSING
    h.send(A, seq=h.gseq + 1, ack=ours + 1)
    assert flow.state == TIME_WAIT and flow in h.host.closed
    h.clock.advance(10)
    assert len(h.engine) == 0


def test_guest_fin_waits_for_backlog_before_shutting_host_write() -> None:
    h = Harness()
    h.host.accept = 0
    flow, ours = h.connect()
    h.send(A | F, ack=ours, data=b"tail")
    assert flow not in h.host.shut
    h.host.accept = None
    flow.host_writable(h.clock.now)
    assert bytes(h.host.written[flow]) == b"tail" and flow in h.host.shut


def test_new_syn_replaces_time_wait_flow() -> None:
    h = Harness()
    flow, ours = h.connect()
    flow.host_eof(h.clock.now)
    h.send(A | F, ack=ours + 1)
    assert flow.state == TIME_WAIT
    h.gseq += 100_000
    h.send(S, options=wtcp.syn_options(mss=1460))
    assert len([c for c in h.host.calls if c[0] == "tcp_connect"]) == 2


def test_keepalive_probes_an_idle_guest_and_gives_up() -> None:
    cfg = TcpConfig(keepalive_idle=60, keepalive_interval=10, keepalive_count=3)
    h = Harness(cfg=cfg)
    flow, ours = h.connect()
    h.clock.advance(59)
    assert h.out() == []
    h.clock.advance(2)
    probe = h.expect_one()
    assert probe.seq == (ours - 1) & M and not probe.data
    h.send(A, ack=ours)  # answered: the connection lives on
    h.clock.advance(50)
    assert len(h.engine) == 1
    h.out()
    h.clock.advance(200)
    outs = h.out()
    assert sum(1 for o in outs if not o.flags & R) >= 3 and outs[-1].flags & R
    assert h.host.closed[flow] is True and len(h.engine) == 0


def test_close_all_resets_everything() -> None:
    h = Harness()
    f1, _ = h.connect(sport=1111)
    f2, _ = h.connect(sport=2222)
    h.engine.close_all(h.clock.now)
    assert sum(1 for o in h.out() if o.flags & R) == 2
    assert h.host.closed == {f1: True, f2: True} and len(h.engine) == 0


# ---------------------------------------------------------------- active open

def test_open_to_guest() -> None:
    h = Harness()
    flow = h.engine.open_to_guest(REMOTE, 5555, GUEST, 8080, h.clock.now)
    assert flow is not None
    syn = h.expect_one()
    assert syn.flags == S and syn.tcp is not None and syn.tcp.options().mss == 1460
    h.send(S | A, seq=7000, ack=syn.seq + 1, sport=8080, dport=5555,
           options=wtcp.syn_options(mss=1460, wscale=7))
    assert flow.state == ESTABLISHED and flow in h.host.calls[-1]
    assert h.host.names()[-1] == "tcp_resume_reading"
    assert h.expect_one().ack == 7001
    h.feed(flow, b"hi guest")
    assert h.expect_one().data == b"hi guest"


def test_open_to_guest_refused() -> None:
    h = Harness()
    flow = h.engine.open_to_guest(REMOTE, 5555, GUEST, 8080, h.clock.now)
    assert flow is not None
    syn = h.expect_one()
    h.send(R | A, seq=0, ack=syn.seq + 1, sport=8080, dport=5555)
    assert h.host.closed[flow] is True and len(h.engine) == 0


# ---------------------------------------------------------------- robustness

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, M), st.integers(0, M),
                          st.integers(0, 0xFFFF), st.binary(max_size=64),
                          st.binary(max_size=12), st.sampled_from([40000, 40001]),
                          st.booleans(), st.booleans()), max_size=12),
       st.binary(max_size=80))
def test_random_segments_never_raise(
        segs: list[tuple[int, int, int, int, bytes, bytes, int, bool, bool]],
        garbage: bytes) -> None:
    h = Harness(cfg=TcpConfig(rcv_buf=8000, snd_buf=8000, max_ooo_segments=4))
    flow, ours = h.connect(sack=True)
    h.feed(flow, b"q" * 3000)
    for flags, seq, ack, window, data, opts, sport, near, host_event in segs:
        if len(opts) % 4:
            opts = opts[: len(opts) // 4 * 4]
        if near:  # plausible numbers reach deeper into the state machine
            seq = (h.gseq + seq % 20000) & M
            ack = (ours + ack % 6000) & M
        h.send(flags, seq=seq, ack=ack, window=window, data=data, options=opts, sport=sport)
        for c in h.host.calls:
            if c[0] == "tcp_connect" and c[1].state == "CONNECTING":
                c[1].host_connected(h.clock.now)
        if host_event:
            for f in list(h.engine.flows.values()):
                h.feed(f, data)
                if window & 1:
                    f.host_eof(h.clock.now)
                f.host_writable(h.clock.now)
        h.clock.advance(0.3)
    head = bytearray(20)
    ipv4.build_header(head, 0, GUEST, REMOTE, 6, len(garbage))
    h.engine.handle(Ipv4Packet(memoryview(bytes(head) + garbage)), h.clock.now, False)
    h.engine.handle(Ipv4Packet(memoryview(bytes(head) + garbage)), h.clock.now, True)
    h.engine.flush(h.clock.now)
    engine = h.engine
    assert engine.buffered == sum(f.buffered for f in engine.flows.values())
    h.clock.advance(1000)
    assert flow.backlog_len <= flow.cfg.rcv_buf + 0xFFFF
    assert engine.buffered == sum(f.buffered for f in engine.flows.values())


# ---------------------------------------------------------------- a lossy end-to-end exchange

class GuestTcp:
    """A tiny guest TCP: go-back-N sender with a fixed timeout, in-order-only receiver."""

    def __init__(self, h: Harness, sport: int, payload: bytes) -> None:
        self.h, self.sport, self.payload = h, sport, payload
        self.received = bytearray()
        self.iss = 5_000_000 + sport
        self.snd_una = self.snd_nxt = 0  # offsets into payload
        self.rcv_nxt = 0
        self.peer_wnd = 0
        self.irs = 0
        self.deadline = 0.0
        self.fin_sent = False
        self.got_fin = False
        self.connected = False
        self.syn_deadline = 0.0

    def syn(self, wire: list[bytes]) -> None:
        seg = wtcp.build(GUEST, REMOTE, self.sport, 80, self.iss, 0, S, 1024,
                         options=wtcp.syn_options(mss=1460, wscale=7,
                                                  sack_permitted=self.sport % 2 == 0))
        head = bytearray(20)
        ipv4.build_header(head, 0, GUEST, REMOTE, 6, len(seg))
        wire.append(bytes(head) + bytes(seg))
        self.syn_deadline = self.h.clock.now + 1.0

    def frames_for_us(self, o: Out) -> bool:
        return o.tcp is not None and o.tcp.dst_port == self.sport

    def on_frame(self, o: Out, wire: list[bytes]) -> None:
        assert o.tcp is not None
        t = o.tcp
        if t.flags & S:
            self.connected = True
            self.irs = t.seq
            self.rcv_nxt = 0
            self.peer_wnd = t.window
            self._emit(A, wire)
            return
        ack_off = (t.ack - self.iss - 1) & M
        if ack_off <= len(self.payload) + 1 and ack_off > self.snd_una:
            self.snd_una = min(ack_off, len(self.payload))
            self.deadline = self.h.clock.now + 1.0
        self.peer_wnd = t.window << 7
        off = (t.seq - self.irs - 1) & M
        data = o.data
        if data and off == self.rcv_nxt:
            self.received += data
            self.rcv_nxt += len(data)
        if t.flags & F and off + len(data) == self.rcv_nxt:
            self.got_fin = True
        if data or t.flags & F:
            self._emit(A, wire)

    def _emit(self, flags: int, wire: list[bytes], off: int | None = None, n: int = 0) -> None:
        off = self.snd_nxt if off is None else off
        seg = wtcp.build(GUEST, REMOTE, self.sport, 80, (self.iss + 1 + off) & M,
                         (self.irs + 1 + self.rcv_nxt + self.got_fin) & M, flags,
                         1024, self.payload[off:off + n])
        head = bytearray(20)
        ipv4.build_header(head, 0, GUEST, REMOTE, 6, len(seg))
        wire.append(bytes(head) + bytes(seg))

    def pump(self, wire: list[bytes], rng: random.Random) -> None:
        now = self.h.clock.now
        if not self.connected:
            if now >= self.syn_deadline:
                self.syn(wire)  # our SYN (or the SYN-ACK) was lost
            return
        if self.snd_una < self.snd_nxt and now >= self.deadline:
            self.snd_nxt = self.snd_una  # go back N
        limit = min(len(self.payload), self.snd_una + self.peer_wnd)
        while self.snd_nxt < limit:
            n = min(rng.choice((1, 100, 1460, 4000)), limit - self.snd_nxt)
            self._emit(A | P, wire, self.snd_nxt, n)
            self.snd_nxt += n
            self.deadline = now + 1.0


@pytest.mark.parametrize("seed", [1234, 5, 77])
@pytest.mark.parametrize("offload", [False, True])
def test_two_flows_survive_random_loss_reordering_and_duplication(offload: bool,
                                                                  seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(offload=offload, vnet_hdr=offload)
    up = {1: rng.randbytes(150_000), 2: rng.randbytes(90_000)}
    down = {1: rng.randbytes(120_000), 2: rng.randbytes(200_000)}
    guests = {k: GuestTcp(h, 30000 + k, up[k]) for k in up}
    to_engine: list[bytes] = []
    for g in guests.values():
        g.syn(to_engine)
    flows: dict[int, TcpFlow] = {}
    down_off = {1: 0, 2: 0}

    dropped = [0, 0]  # frames toward the engine, toward the guest

    def lossy(frames: list[bytes], way: int) -> list[bytes]:
        out = []
        for f in frames:
            r = rng.random()
            if r < 0.05:
                dropped[way] += 1
                continue  # lost
            out.append(f)
            if r > 0.97:
                out.append(f)  # duplicated
        for i in range(len(out) - 1):  # local reordering
            if rng.random() < 0.1:
                out[i], out[i + 1] = out[i + 1], out[i]
        return out

    for _ in range(4000):
        for f in lossy(to_engine, 0):
            h.engine.handle(Ipv4Packet(memoryview(f)), h.clock.now, False)
        to_engine = []
        h.engine.flush(h.clock.now)
        for c in h.host.calls:
            if c[0] == "tcp_connect" and c[1] not in flows.values():
                flows[c[1].guest_port - 30000] = c[1]
                c[1].host_connected(h.clock.now)
        for k, flow in flows.items():
            if flow.state in (ESTABLISHED, CLOSE_WAIT) and down_off[k] < len(down[k]):
                n = min(flow.host_read_budget(), 20_000, len(down[k]) - down_off[k])
                if n:
                    h.feed(flow, down[k][down_off[k]:down_off[k] + n])
                    down_off[k] += n
                if down_off[k] == len(down[k]):
                    flow.host_eof(h.clock.now)
        for raw in lossy(h.sink.take(), 1):
            o = parse(raw, offload)
            for g in guests.values():
                if g.frames_for_us(o):
                    g.on_frame(o, to_engine)
        for g in guests.values():
            g.pump(to_engine, rng)
        h.clock.advance(0.05)
        if all(g.got_fin and g.snd_una == len(g.payload) for g in guests.values()):
            break
    assert dropped[0] and dropped[1]  # recovery was needed both ways
    for k, g in guests.items():
        assert bytes(g.received) == down[k], f"flow {k} download corrupted"
        assert bytes(h.host.written[flows[k]]) == up[k], f"flow {k} upload corrupted"


def test_window_closed_on_data_in_flight_is_probed_not_given_up() -> None:
    h = Harness(cfg=TcpConfig(max_retries=3))
    flow, ours = h.connect()
    h.feed(flow, b"A" * 1000)
    assert h.expect_one().data == b"A" * 1000
    probes = 0
    for _ in range(100):  # a guest that is alive but does not read, for a long while
        h.send(A, ack=ours, window=0)
        h.clock.advance(2)
        for o in h.out():
            assert not o.flags & R
            probes += not o.data
    assert probes >= 3
    assert len(h.engine) == 1
    h.send(A, ack=ours, window=100)
    assert b"".join(o.data for o in h.out()) == b"A" * 1000


def test_guest_rst_while_connecting_aborts_the_host_connect() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460))
    flow = h.host.calls[0][1]
    h.send(R, seq=h.gseq + 1)
    assert h.host.closed[flow] is True and len(h.engine) == 0 and h.engine.half_open == 0
    flow.host_connected(h.clock.now)  # a late report changes nothing
    assert h.out() == []


def test_flow_table_limit_drops_new_syns() -> None:
    h = Harness(cfg=TcpConfig(max_flows=2))
    h.connect(sport=1)
    h.connect(sport=2)
    h.send(S, sport=3)
    assert len(h.engine) == 2 and h.link.counters["tcp.drop.max_flows"] == 1
    assert h.out() == []


def test_unanswered_zero_window_probes_give_up() -> None:
    h = Harness(cfg=TcpConfig(max_retries=3))
    flow, ours = h.connect(window=0)
    h.feed(flow, b"stuck")
    h.clock.advance(600)  # the guest vanished
    outs = h.out()
    assert [o.flags & R for o in outs].count(R) == 1 and outs[-1].flags & R
    assert h.host.closed[flow] is True and len(h.engine) == 0


def test_backlog_nobody_reads_after_the_guest_left_is_dropped_in_the_end() -> None:
    h = Harness(cfg=TcpConfig(drain_timeout=30))
    h.host.accept = 0
    flow, ours = h.connect()
    flow.host_eof(h.clock.now)
    h.send(A | F, ack=ours + 1, data=b"never read")
    assert flow.state == TIME_WAIT and flow not in h.host.closed
    h.clock.advance(10)
    assert len(h.engine) == 1  # still trying to hand the data over
    h.clock.advance(60)
    assert h.host.closed[flow] is True and len(h.engine) == 0
    assert h.link.counters["tcp.drain_timeout"] == 1


def test_rst_in_time_wait_is_ignored() -> None:
    h = Harness()
    flow, ours = h.connect()
    flow.host_eof(h.clock.now)
    h.send(A | F, ack=ours + 1)
    assert flow.state == TIME_WAIT
    h.send(R, seq=h.gseq + 1)
    assert len(h.engine) == 1 and flow.state == TIME_WAIT


def test_host_data_before_the_handshake_completes_is_sent_after_it() -> None:
    h = Harness()
    h.send(S, options=wtcp.syn_options(mss=1460, wscale=7))
    flow = h.host.calls[0][1]
    flow.host_connected(h.clock.now)
    synack = h.expect_one()
    h.feed(flow, b"220 smtp ready\r\n")  # the server speaks first
    assert h.out() == []
    h.send(A, seq=h.gseq + 1, ack=synack.seq + 1)
    assert h.expect_one().data == b"220 smtp ready\r\n"


def test_sending_rate_regrows_after_a_loss_when_acks_cover_whole_frames() -> None:
    h = Harness()
    flow, ours = h.connect(window=60000)
    h.feed(flow, bytes(3_000_000))
    h.out()
    # Three duplicate ACKs halve the flight; each round the guest then ACKs all
    # it got with one ACK (as it does per GSO frame).
    acked = ours
    for _ in range(3):
        h.send(A, ack=acked, window=60000)
    h.out()
    first = last = 0
    for rnd in range(40):
        flow_before = flow.snd_max
        h.send(A, ack=flow_before, window=60000)
        sent = sum(len(o.data) for o in h.out())
        if rnd == 1:
            first = sent
        last = sent
    assert last > first + 20 * 1460


def test_fin_held_out_of_order_takes_effect_when_the_gap_fills() -> None:
    h = Harness()
    flow, ours = h.connect()
    h.send(A | F, seq=h.gseq + 5, ack=ours, data=b"world")
    assert flow.state == ESTABLISHED and flow not in h.host.shut
    h.send(A, seq=h.gseq, ack=ours, data=b"hello")
    assert bytes(h.host.written[flow]) == b"helloworld"
    assert flow.state == CLOSE_WAIT and flow in h.host.shut
    assert h.out()[-1].ack == h.gseq + 11


def test_full_table_recycles_time_wait_flows_for_new_connections() -> None:
    h = Harness(cfg=TcpConfig(max_flows=3, time_wait=60))
    for port in (1, 2, 3):  # servers that close first leave TIME_WAIT flows behind
        flow, ours = h.connect(sport=port)
        flow.host_eof(h.clock.now)
        h.send(A | F, ack=ours + 1)
        h.gseq += 1
        assert flow.state == TIME_WAIT
        h.out()
    h.send(S, sport=4)
    assert len(h.engine) == 3 and h.link.counters["tcp.time_wait_evicted"] == 1
    assert (GUEST, 1, REMOTE, 80) not in h.engine.flows  # the oldest went
    h.clock.advance(120)
    assert len(h.engine) == 1 and not h.engine.time_wait


def test_consecutive_host_reads_do_not_leave_runt_frames() -> None:
    h = Harness()
    flow, ours = h.connect(window=8000)
    flow.cwnd = 1 << 22
    data = random.Random(5).randbytes(4 * 65536)
    for i in range(4):  # one readable callback: four reads, then the runtime flushes
        flow.host_data(data[i * 65536:(i + 1) * 65536], h.clock.now)
    h.engine.flush(h.clock.now)
    outs = h.out()
    assert b"".join(o.data for o in outs) == data
    assert [len(o.data) for o in outs[:-1]] == [64240] * (len(outs) - 1)
    assert len(outs) == 5 and outs[-1].flags & P


def test_dsack_for_a_probe_is_not_a_duplicate_ack() -> None:
    h = Harness()
    flow, ours = h.connect(window=4000, sack=True)
    flow.cwnd = 1 << 20
    flow.host_data(bytes(5 * 64240), h.clock.now)
    h.engine.flush(h.clock.now)
    assert len(h.out()) == 5
    # The guest reports, again and again, a segment it got twice (below its ACK),
    # with a window that keeps moving: that is no sign of loss.
    for i in range(4):
        h.send(A, ack=ours + 1000, window=4000 + i,
               options=wtcp.sack_option([(ours, ours + 1000)]))
    assert h.out() == [] and h.link.counters["tcp.fast_retransmit"] == 0
