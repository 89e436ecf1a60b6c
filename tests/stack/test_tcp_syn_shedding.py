"""SYN-flood shedding: while the admission bucket is empty the stack refuses a
guest's new SYNs from the raw frame (TcpEngine.shed_syn) instead of parsing
Ethernet, IPv4 and TCP for each. It must change nothing but the cost: the same
host calls, the same frames to the guest, the same counters as the full path,
whatever the frames are (floods mixed with a download's ACKs, duplicate SYNs,
SYNs to known destinations, odd flags, fragments, bad headers, other sources).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pyslirp.stack.admission import TokenBucket
from pyslirp.wire import ethernet, ipv4, vnet
from pyslirp.wire import tcp as wtcp
from pyslirp.wire.checksum import checksum
from tests.hotpath import GATEWAY_IP, GUEST_IP, SERVER_PORT, Rig

SYN, ACK, RST, FIN = wtcp.SYN, wtcp.ACK, wtcp.RST, wtcp.FIN
ECE_CWR = 0xC0


def frame(src: bytes = GUEST_IP, dst: bytes = GATEWAY_IP, sport: int = 50000,
          dport: int = 9, flags: int = SYN, seq: int = 1, ack: int = 0,
          vnet_flags: int = vnet.F_DATA_VALID, frag: int = 0x4000,
          bad_ip_sum: bool = False, bad_tcp_sum: bool = False,
          guest_mac: bytes | None = None) -> bytes:
    """A guest frame (vnet header first) carrying one TCP segment."""
    rig_mac = bytes.fromhex("020000000064") if guest_mac is None else guest_mac
    seg = bytes(wtcp.build(src, dst, sport, dport, seq, ack, flags, 64240, b"",
                           wtcp.syn_options(mss=1460, wscale=7) if flags & SYN else b""))
    head = bytearray(vnet.HEADER_LEN + ethernet.HEADER_LEN + 20)
    head[:vnet.HEADER_LEN] = vnet.build(vnet_flags)
    ethernet.build_header(head, vnet.HEADER_LEN, bytes.fromhex("525500000002"), rig_mac,
                          ethernet.ETHERTYPE_IPV4)
    ip_at = vnet.HEADER_LEN + ethernet.HEADER_LEN
    ipv4.build_header(head, ip_at, src, dst, 6, len(seg))
    if frag != 0x4000:
        head[ip_at + 6:ip_at + 8] = frag.to_bytes(2, "big")
        head[ip_at + 10:ip_at + 12] = b"\0\0"
        head[ip_at + 10:ip_at + 12] = ipv4_sum(head[ip_at:ip_at + 20])
    if bad_ip_sum:
        head[ip_at + 10] ^= 0x55
    if bad_tcp_sum:
        seg = seg[:14] + bytes([seg[14] ^ 0x55]) + seg[15:]  # the window, not the sum
    return bytes(head) + seg


def ipv4_sum(header: bytes | bytearray) -> bytes:
    return checksum(bytes(header)).to_bytes(2, "big")


#: Stands in the list for an ACK of the rig's established flow (its sequence
#: numbers are the rig's own: random).
DOWNLOAD_ACK = None


def flood(seed: int, n: int = 4000) -> list[bytes | None]:
    """A SYN flood to ever new ports of the gateway, with every kind of odd frame
    mixed in, and the established download's ACKs."""
    rng = random.Random(seed)
    frames: list[bytes | None] = []
    for i in range(n):
        sport = 20000 + i
        kind = rng.random()
        if kind < 0.70:
            frames.append(frame(sport=sport, dport=10000 + i))
        elif kind < 0.74:
            j = rng.randrange(max(i, 1))
            frames.append(frame(sport=20000 + j, dport=10000 + j))  # a SYN resent
        elif kind < 0.77:
            frames.append(frame(sport=sport, dport=SERVER_PORT))  # a destination known good
        elif kind < 0.80:
            frames.append(frame(sport=sport, dport=10000 + i, flags=SYN | ECE_CWR))
        elif kind < 0.82:
            frames.append(frame(sport=sport, dport=7, flags=rng.choice([SYN | ACK, SYN | RST,
                                                                      SYN | FIN, ACK])))
        elif kind < 0.84:
            frames.append(frame(sport=sport, dport=7, frag=0x2000))  # more fragments
        elif kind < 0.86:
            frames.append(frame(sport=sport, dport=7, bad_ip_sum=True))
        elif kind < 0.87:
            frames.append(frame(sport=sport, dport=7, vnet_flags=0))  # checksum not vouched for
        elif kind < 0.88:
            frames.append(frame(sport=sport, dport=7, vnet_flags=0, bad_tcp_sum=True))
        elif kind < 0.90:
            frames.append(frame(src=bytes([10, 0, 2, 77]), sport=sport, dport=7))
        elif kind < 0.91:
            frames.append(frame(sport=sport, dport=7, guest_mac=bytes.fromhex("020000000099")))
        elif kind < 0.93:
            frames.append(frame(dst=rng.choice([bytes([10, 0, 2, 255]), bytes([224, 0, 0, 1]),
                                                bytes(4)]), sport=sport, dport=7))
        else:
            frames.append(DOWNLOAD_ACK)
    return frames


def replay(frames: list[bytes | None], shed: bool) -> tuple[Rig, list[Any], int]:
    """The frames through a fresh stack, 0.1 ms apart, admission 100/s (bursts of
    20). Returns the rig, what happened (host calls with flows by their ports, and
    the guest's address and MAC as the stack knew them after each frame) and how
    many frames were shed."""
    rig = Rig()
    tcp = rig.stack.tcp
    tcp.new_flows = TokenBucket(100.0, 20)
    shed_count = 0
    real = tcp.shed_syn

    def counted(*args: Any) -> bool:
        nonlocal shed_count
        if not shed:
            return False
        result = real(*args)
        shed_count += result
        return result

    tcp.shed_syn = counted  # type: ignore[method-assign]
    rig.host.calls.clear()
    now = rig.now
    download_ack = rig.frame(ACK, rig.guest_seq, rig.flow.snd_nxt)
    guest = []
    for i, raw in enumerate(frames):
        now += 0.0001
        rig.stack.receive_frame(memoryview(download_ack if raw is None else raw), now)
        guest.append((rig.stack.guest_ip, rig.stack.link.guest_mac))
        if i % 16 == 15:
            rig.stack.flush(now)
    calls = [(c[0], c[1].guest_port, c[1].remote_port) if hasattr(c[1], "guest_port")
             else c[:1] for c in rig.host.calls]
    return rig, [calls, guest], shed_count


def test_shedding_a_syn_flood_changes_nothing_but_the_cost() -> None:
    for seed in (1, 2, 3):
        frames = flood(seed)
        full, full_calls, _ = replay(frames, shed=False)
        fast, fast_calls, shed = replay(frames, shed=True)
        assert shed > len(frames) // 2, f"only {shed} of {len(frames)} frames shed"
        assert fast_calls == full_calls
        assert dict(fast.stack.link.counters) == dict(full.stack.link.counters)
        assert fast.sink.frames == full.sink.frames
        assert sorted(fast.stack.tcp.flows) == sorted(full.stack.tcp.flows)
        # The bucket's state is the same (a shed SYN skips a refused take, which
        # only moves the time its refill is counted from).
        assert tokens_at(fast, 2000.0) == pytest.approx(tokens_at(full, 2000.0))


def tokens_at(rig: Rig, now: float) -> float:
    bucket = rig.stack.tcp.new_flows
    assert bucket.at is not None
    return min(bucket.burst, bucket.tokens + (now - bucket.at) * bucket.rate)


def test_no_shedding_while_the_admission_bucket_has_tokens() -> None:
    """Below the admission rate every SYN takes the full path (and opens a flow)."""
    rig = Rig()
    now = rig.now
    for i in range(50):
        now += 0.01
        rig.stack.receive_frame(memoryview(frame(sport=30000 + i, dport=10000 + i)), now)
    assert rig.stack.tcp.syn_shed_until == 0.0
    assert rig.stack.link.counters["tcp.flows_opened"] == 51  # the rig's own flow too
