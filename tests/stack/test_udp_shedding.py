"""Shedding a UDP flood before the parse (UdpEngine.shed): while a flow's datagrams
to new destinations are refused by admission, the runtime drops them from the raw
frame. It must decide exactly as the whole path would: the host sees the same
datagrams, the guest's other traffic (known destinations, DNS, other flows) is
never shed, and the counters say the same."""

from __future__ import annotations

from typing import Any

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP

from pyslirp.wire import ethernet
from tests.stack.fakes import StackHarness

GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
FLOOD_PORT = 41000


def _frames(h: StackHarness) -> list[tuple[float, bytes]]:
    # As the TAP device reads them: batches of 128 frames share one ``now``.
    """A guest flooding ever new ports from one socket, amid its real traffic: the
    same socket's known peer, DNS from the same port, another socket's datagrams."""
    def frame(pkt: Any) -> bytes:
        return h.frame(ethernet.ETHERTYPE_IPV4, bytes(pkt))
    known = frame(IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT, dport=7000) / b"known")
    dns = frame(IP(src=GUEST, dst="10.0.2.3") / UDP(sport=FLOOD_PORT, dport=53)
                / DNS(id=1, rd=1, qd=DNSQR(qname="example.test")))
    other = frame(IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT + 1, dport=7001) / b"other")
    # Checksum 0 (none) so that the destination port can be patched in place.
    flood = bytearray(frame(IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT, chksum=0)
                            / (b"x" * 64)))
    dport_at = len(flood) - 64 - 6
    out = [(1000.0, known)]
    for i in range(12000):
        now = 1000.0 + (i // 128) * 0.004
        if i % 97 == 0:
            out.append((now, known))
        elif i % 101 == 0:
            out.append((now, dns))
        elif i % 103 == 0:
            out.append((now, other))
        else:
            flood[dport_at:dport_at + 2] = (20000 + i).to_bytes(2, "big")
            out.append((now, bytes(flood)))
    return out


def _run(shedding: bool, vnet_hdr: bool) -> tuple[StackHarness, int]:
    h = StackHarness(vnet_hdr=vnet_hdr, offload=vnet_hdr, new_flow_rate=2000.0,
                     new_flow_burst=500, dns_upstreams=[("127.0.0.1", 53)])
    udp = h.stack.udp
    shed = 0
    for now, frame in _frames(h):
        h.now = now
        if shedding and udp.shedding and udp.shed(frame, now):
            shed += 1
            continue
        h.stack.receive_frame(memoryview(frame), now)
    h.stack.flush(h.now)
    return h, shed


def _host_calls(h: StackHarness) -> list[tuple[Any, ...]]:
    """What the host was asked to do, in order (a DNS query by its upstream: the
    forwarder gives each its own random ID)."""
    return [c[:1] + (c[2:] if c[0] != "dns_send" else c[2:3])
            for c in h.host.calls if c[0] in ("udp_send", "dns_send", "udp_open")]


def test_shedding_decides_as_the_whole_path_does() -> None:
    for vnet_hdr in (False, True):
        whole, _ = _run(shedding=False, vnet_hdr=vnet_hdr)
        shed, n_shed = _run(shedding=True, vnet_hdr=vnet_hdr)
        # Per batch of 128: the bucket's 8 new tokens, one refusal, the real traffic.
        assert n_shed > 12000 - 600 - 94 * 12, "the flood's frames were refused unparsed"
        assert _host_calls(shed) == _host_calls(whole)
        assert shed.counters == whole.counters
        sent = [c for c in _host_calls(shed) if c[0] == "udp_send"]
        assert any(c[2] == b"other" for c in sent), "the other socket was never shed"
        assert any(c[0] == "dns_send" for c in _host_calls(shed)), "DNS still answered"


def test_shedding_ends_when_the_bucket_refills() -> None:
    h, _ = _run(shedding=True, vnet_hdr=False)
    udp = h.stack.udp
    later = h.now + 1.0
    frame = h.frame(ethernet.ETHERTYPE_IPV4, bytes(
        IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT, dport=9999) / b"new"))
    assert not udp.shed(frame, later)
    assert not udp.shedding, "stale entries are dropped, so the device stops asking"
