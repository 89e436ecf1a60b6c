"""TCP, UDP and DNS over IPv6 through the shared engines (StackHarness, scapy frames).

The guest is fd00::100 on the default prefix; the gateway fd00::2 is the host's ::1,
the DNS address fd00::3 the upstream resolvers. Frames to the guest are dissected by
scapy, which also checks what the guest's kernel would: the checksums.
"""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from pyslirp.stack.udp import ICMP_ERROR_BURST
from pyslirp.wire import ethernet, vnet
from tests.stack import fakes

GUEST_MAC = "02:00:00:00:00:64"
GUEST = "fd00::100"
GATEWAY = "fd00::2"
DNS = "fd00::3"
MTU = 1500


def harness(**cfg: Any) -> fakes.StackHarness:
    cfg.setdefault("dns_upstreams", [("::1", 5353)])
    return fakes.StackHarness(enable_ipv6=True, **cfg)


def send(h: fakes.StackHarness, pkt: Packet) -> None:
    h.send_frame(h.frame(ethernet.ETHERTYPE_IPV6, bytes(pkt)))


def replies(h: fakes.StackHarness) -> list[Packet]:
    """IPv6 frames to the guest, checksums verified (the guest kernel would drop others)."""
    out = []
    for raw in h.replies():
        frame = Ether(raw)
        if IPv6 not in frame or frame[IPv6].nh == 58:  # RAs and the like are not ours
            continue
        l4 = frame[IPv6].payload
        stored = l4.chksum
        del l4.chksum
        assert IPv6(bytes(frame[IPv6])).payload.chksum == stored, "bad checksum"
        out.append(Ether(raw))
    return out


def open_flow(h: fakes.StackHarness, dport: int = 80, sport: int = 40000,
              opts: list[tuple[str, Any]] | None = None) -> tuple[Any, Packet]:
    syn = IPv6(src=GUEST, dst=GATEWAY) / TCP(sport=sport, dport=dport, flags="S", seq=1000,
                                               options=opts or [("MSS", 1440), ("SAckOK", b""),
                                                                ("WScale", 7)])
    send(h, syn)
    call = h.host.last("tcp_connect")
    assert call is not None
    flow = call[1]
    flow.host_connected(h.now)
    synack = replies(h)[-1]
    send(h, IPv6(src=GUEST, dst=GATEWAY) / TCP(sport=sport, dport=dport, flags="A", seq=1001,
                                                 ack=synack[TCP].seq + 1))
    return flow, synack


def test_handshake_to_the_gateway_connects_to_host_loopback() -> None:
    h = harness()
    flow, synack = open_flow(h)
    assert h.host.last("tcp_connect")[2] == [("::1", 80)]
    assert synack[IPv6].src == GATEWAY and synack[IPv6].dst == GUEST
    assert synack[TCP].flags == "SA" and synack[TCP].ack == 1001
    opts = dict(synack[TCP].options)
    assert opts["MSS"] == MTU - 60, "IPv6 header is 40 bytes: MSS = MTU - 60"
    assert "SAckOK" in opts and "WScale" in opts
    assert flow.state == "ESTABLISHED"


def test_data_both_ways_over_ipv6() -> None:
    h = harness()
    flow, synack = open_flow(h)
    send(h, IPv6(src=GUEST, dst=GATEWAY) / TCP(sport=40000, dport=80, flags="PA", seq=1001,
                                                 ack=synack[TCP].seq + 1) / Raw(b"GET /"))
    assert h.host.last("tcp_write")[2] == 5
    ack = replies(h)[-1]
    assert ack[TCP].ack == 1006
    flow.host_data(b"hello over six", h.now)
    h.stack.flush(h.now)
    data = replies(h)[-1]
    assert bytes(data[TCP].payload) == b"hello over six"
    assert data[IPv6].src == GATEWAY


def test_out_of_order_data_gets_sack_blocks() -> None:
    h = harness()
    _flow, synack = open_flow(h)
    ack = synack[TCP].seq + 1
    send(h, IPv6(src=GUEST, dst=GATEWAY) / TCP(sport=40000, dport=80, flags="A", seq=1101,
                                                 ack=ack) / Raw(b"x" * 100))
    dup = replies(h)[-1]
    assert dup[TCP].ack == 1001
    assert ("SAck", (1101, 1201)) in dup[TCP].options


def test_offloaded_download_is_one_gso_tcpv6_frame() -> None:
    h = harness(vnet_hdr=True, offload=True)
    flow, _synack = open_flow(h)
    flow.cwnd = 1 << 20
    flow.host_data(bytes(30000), h.now)
    h.stack.flush(h.now)
    frames = h.sink.take()
    gso = [vnet.unpack(f)[1] for f in frames]
    assert vnet.GSO_TCPV6 in gso


def test_refused_destination_gets_icmpv6_unreachable() -> None:
    h = harness(disable_host_loopback=True)
    send(h, IPv6(src=GUEST, dst=GATEWAY) / TCP(sport=40000, dport=80, flags="S", seq=1))
    assert h.host.last("tcp_connect") is None
    [err] = [Ether(f) for f in h.replies() if IPv6 in Ether(f)]
    assert err[IPv6].nh == 58 and bytes(err[IPv6].payload)[0] == 1  # destination unreachable


def test_udp_to_the_gateway_and_back() -> None:
    h = harness()
    send(h, IPv6(src=GUEST, dst=GATEWAY) / UDP(sport=5000, dport=7) / Raw(b"ping"))
    call = h.host.last("udp_send")
    assert call is not None and call[2] == ("::1", 7) and call[3] == b"ping"
    flow = call[1]
    assert flow.v6
    h.stack.udp.host_datagram(flow, "::1", 7, b"pong", h.now)
    [reply] = replies(h)
    assert reply[IPv6].src == GATEWAY and reply[UDP].sport == 7 and reply[UDP].dport == 5000
    assert bytes(reply[UDP].payload) == b"pong"


def test_ipv4_and_ipv6_flows_with_the_same_ports_are_apart() -> None:
    h = harness()
    send(h, IPv6(src=GUEST, dst=GATEWAY) / UDP(sport=5000, dport=7) / Raw(b"six"))
    h.send_ipv4(bytes(IP(src="10.0.2.100", dst="10.0.2.2") / UDP(sport=5000, dport=7)
                      / Raw(b"four")))
    sends = [c for c in h.host.calls if c[0] == "udp_send"]
    assert [c[2] for c in sends] == [("::1", 7), ("127.0.0.1", 7)]
    assert sends[0][1] is not sends[1][1] and len(h.stack.udp) == 2


def test_dns_query_to_fd00_3_is_forwarded_and_answered_over_ipv6() -> None:
    h = harness()
    query = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x1c\x00\x01"
    send(h, IPv6(src=GUEST, dst=DNS) / UDP(sport=3333, dport=53) / Raw(query))
    call = h.host.last("dns_send")
    assert call is not None and call[2] == ("::1", 5353)
    wire_id = call[3][:2]
    answer = wire_id + bytes.fromhex("81800001000000000000") + query[12:]
    h.stack.dns.upstream_datagram(("::1", 5353), answer, h.now)
    [reply] = replies(h)
    assert reply[IPv6].src == DNS and reply[UDP].dport == 3333
    assert bytes(reply[UDP].payload)[:2] == b"\xab\xcd"


@pytest.mark.parametrize("dst", [
    "::ffff:127.0.0.1", "::", "::1", "fe80::1", "ff02::1", "fd00::77", "::ffff:10.0.2.2",
])
def test_ipv6_destinations_that_never_reach_the_host(dst: str) -> None:
    h = harness()
    send(h, IPv6(src=GUEST, dst=dst) / TCP(sport=40000, dport=80, flags="S", seq=1))
    send(h, IPv6(src=GUEST, dst=dst) / UDP(sport=5000, dport=80) / Raw(b"x"))
    assert not {c[0] for c in h.host.calls} & {"tcp_connect", "udp_open", "udp_send"}


def test_ipv6_policy_maps_gateway_dns_and_outside() -> None:
    h = harness()
    p = h.policy
    from pyslirp.wire import ipv6
    assert p(ipv6.addr_from_str(GATEWAY), 22) == [("::1", 22)]
    assert p(h.config.link_local6, 22) == [("::1", 22)]
    assert p(ipv6.addr_from_str(DNS), 53) == [("::1", 5353)]
    assert p(ipv6.addr_from_str(DNS), 80) is None
    assert p(ipv6.addr_from_str("2001:db8::1"), 443) == [("2001:db8::1", 443)]
    assert harness(disable_host_loopback=True).policy(ipv6.addr_from_str(GATEWAY), 22) is None


# ---- ICMPv6 errors the host's UDP socket got (IPV6_RECVERR) ---------------------------

def _udp_flow(h: fakes.StackHarness, dst: str, dport: int) -> Any:
    send(h, IPv6(src=GUEST, dst=dst) / UDP(sport=5000, dport=dport) / Raw(b"anyone?"))
    call = h.host.last("udp_send")
    assert call is not None
    return call[1]


def _icmpv6_errors(h: fakes.StackHarness) -> list[Packet]:
    out = []
    for raw in h.replies():
        frame = Ether(raw)
        if IPv6 in frame and frame[IPv6].nh == 58 and bytes(frame[IPv6].payload)[0] < 128:
            stored = frame[IPv6].payload.cksum
            check = frame[IPv6].copy()
            del check.payload.cksum
            assert IPv6(bytes(check)).payload.cksum == stored, "bad ICMPv6 checksum"
            out.append(frame)
    return out


def test_port_unreachable_from_the_host_reaches_the_guest_from_the_gateway() -> None:
    h = harness()
    flow = _udp_flow(h, GATEWAY, 9)
    h.stack.udp.host_error(flow, ("::1", 9), 1, 4, h.now)
    [err] = _icmpv6_errors(h)
    assert (err[IPv6].src, err[IPv6].dst) == (GATEWAY, GUEST)
    body = bytes(err[IPv6].payload)
    assert body[:2] == b"\x01\x04"  # destination unreachable, port unreachable
    quoted = IPv6(body[8:])
    assert (quoted.src, quoted.dst, quoted.nh) == (GUEST, GATEWAY, 17)
    assert (quoted[UDP].sport, quoted[UDP].dport) == (5000, 9)
    assert h.counters["udp.icmp_errors"] == 1


def test_other_unreachables_and_time_exceeded_come_from_the_gateway() -> None:
    h = harness()
    flow = _udp_flow(h, "2001:db8::7", 33434)
    h.stack.udp.host_error(flow, ("2001:db8::7", 33434), 1, 3, h.now)
    h.stack.udp.host_error(flow, ("2001:db8::7", 33434), 3, 0, h.now)
    errs = _icmpv6_errors(h)
    assert [bytes(e[IPv6].payload)[:2] for e in errs] == [b"\x01\x03", b"\x03\x00"]
    assert {e[IPv6].src for e in errs} == {GATEWAY}
    assert IPv6(bytes(errs[0][IPv6].payload)[8:]).dst == "2001:db8::7"


def test_packet_too_big_tells_the_guest_the_host_path_mtu() -> None:
    h = harness()
    flow = _udp_flow(h, "2001:db8::7", 443)
    h.stack.udp.host_error(flow, ("2001:db8::7", 443), 2, 0, h.now, 1400)
    [err] = _icmpv6_errors(h)
    body = bytes(err[IPv6].payload)
    assert body[0] == 2 and int.from_bytes(body[4:8], "big") == 1400
    assert err[IPv6].src == GATEWAY


def test_icmpv6_errors_are_rate_limited_but_packet_too_big_is_not() -> None:
    h = harness()
    flow = _udp_flow(h, "2001:db8::7", 443)
    for _ in range(2 * ICMP_ERROR_BURST):
        h.stack.udp.host_error(flow, ("2001:db8::7", 443), 1, 4, h.now)
    assert len(_icmpv6_errors(h)) == ICMP_ERROR_BURST
    assert h.counters["drop.udp.icmp_rate"] == ICMP_ERROR_BURST
    # The bucket is empty, yet the path MTU still reaches the guest (as in Linux).
    h.stack.udp.host_error(flow, ("2001:db8::7", 443), 2, 0, h.now, 1400)
    [err] = _icmpv6_errors(h)
    assert bytes(err[IPv6].payload)[0] == 2


@pytest.mark.parametrize("icmp_type, code, info", [
    (2, 0, MTU),   # no smaller than our link: nothing the guest could act on
    (2, 0, 1000),  # below the IPv6 minimum: bogus
    (4, 0, 0),     # parameter problem: about the host's own header
    (137, 0, 0),   # not an error at all
])
def test_errors_the_guest_cannot_use_are_not_passed_on(icmp_type: int, code: int,
                                                       info: int) -> None:
    h = harness()
    flow = _udp_flow(h, "2001:db8::7", 443)
    h.stack.udp.host_error(flow, ("2001:db8::7", 443), icmp_type, code, h.now, info)
    assert _icmpv6_errors(h) == []
    assert h.counters["drop.udp.host_error_ignored"] == 1
