"""A whole Stack on a fake TAP, with one established TCP flow, for hot-path measurements.

Used by the deterministic call-count guard (tests/test_hotpath_budget.py) and by
the pytest-benchmark microbenchmarks (bench/test_hotpath.py), so both measure the
same path: complete frames (vnet header + Ethernet + IPv4 + TCP/UDP) into
``Stack.receive_frame`` and ``Stack.flush``, host data into ``TcpFlow.host_data``
and ``UdpEngine.host_datagram``. ``Rig(ipv6=True)`` is the same over IPv6 (guest
fd00::100 to the gateway fd00::2).

Besides 64 KB bulk frames the rig drives the small transactions bench/run.py
times (issue "small transactions as cheap as in C"): a 1-byte exchange on the
established flow, a whole short connection (SYN to the last ACK), one UDP
datagram each way and one DNS query forwarded and answered; and idle
connections, for the memory guard (tests/test_memory_budget.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pyslirp.stack.config import NetConfig
from pyslirp.stack.stack import Stack
from pyslirp.wire import ethernet, ipv4, ipv6, vnet
from pyslirp.wire import tcp as wtcp
from pyslirp.wire import udp as wudp
from tests.stack.fakes import FakeHost

GUEST_MAC = bytes.fromhex("020000000064")
GUEST_IP = bytes([10, 0, 2, 100])
GATEWAY_IP = bytes([10, 0, 2, 2])
GUEST_IP6 = ipv6.addr_from_str("fd00::100")
GATEWAY_IP6 = ipv6.addr_from_str("fd00::2")
GUEST_PORT = 40000
SERVER_PORT = 5201
MSS = 1460
SUPER_PAYLOAD = 44 * MSS  # what the guest kernel hands us with TSO at MTU 1500
UDP_GUEST_PORT = 41000
UDP_PORT = 5353
DNS_GUEST_PORT = 42000
DNS_UPSTREAM = ("127.0.0.1", 53)
#: An A query for example.com (ID 0, patched per query) and the answer record a
#: resolver appends to the echoed question (name compressed, 127.0.0.1, TTL 60).
DNS_QUESTION = b"\x07example\x03com\x00\x00\x01\x00\x01"
DNS_ANSWER_RR = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\x7f\x00\x00\x01"


class CountingSink:
    """Keeps only the last frame, so a long run does not hold every frame."""

    def __init__(self) -> None:
        self.frames = 0
        self.last: Sequence[Any] = ()

    def __call__(self, parts: Sequence[Any]) -> None:
        self.frames += 1
        self.last = parts


class SinkHost(FakeHost):
    """A host socket that takes every byte at once and keeps none (no copy to time)."""

    def tcp_write(self, flow: Any, data: Any) -> int:
        self.calls.append(("tcp_write", flow, len(data)))
        return len(data)


class Rig:
    def __init__(self, ipv6: bool = False) -> None:
        self.ipv6 = ipv6
        self.guest_ip, self.gateway_ip = (GUEST_IP6, GATEWAY_IP6) if ipv6 else (GUEST_IP,
                                                                               GATEWAY_IP)
        self.config = NetConfig(vnet_hdr=True, offload=True, enable_ipv6=ipv6)
        self.sink = CountingSink()
        self.host = SinkHost()
        self.stack = Stack(self.config, self.sink, self.host)
        self.stack.set_dns_upstreams([DNS_UPSTREAM])
        self.now = 1000.0
        self.guest_seq = 1_000_000
        self.payload = bytes(range(256)) * (SUPER_PAYLOAD // 256) + bytes(SUPER_PAYLOAD % 256)
        self._handshake()

    def frame(self, flags: int, seq: int, ack: int, payload: bytes = b"",
              options: bytes = b"", window: int = 0xFFFF, port: int = GUEST_PORT) -> bytes:
        seg = wtcp.build(GUEST_IP, GATEWAY_IP, port, SERVER_PORT, seq, ack, flags,
                         window, payload, options)
        return self._ip_frame(6, bytes(seg))

    def _ip_frame(self, proto: int, l4: bytes, dst: bytes | None = None) -> bytes:
        """``l4`` from the guest to ``dst`` (the gateway by default) in a whole frame."""
        # (L4 checksums are left unfinished: the vnet header vouches for them.)
        l3_len = ipv6.HEADER_LEN if self.ipv6 else 20
        head = bytearray(vnet.HEADER_LEN + ethernet.HEADER_LEN + l3_len)
        head[:vnet.HEADER_LEN] = vnet.build(vnet.F_DATA_VALID)
        ethernet.build_header(head, vnet.HEADER_LEN, self.config.our_mac, GUEST_MAC,
                              ethernet.ETHERTYPE_IPV6 if self.ipv6 else ethernet.ETHERTYPE_IPV4)
        if self.ipv6:
            ipv6.build_header(head, vnet.HEADER_LEN + ethernet.HEADER_LEN, self.guest_ip,
                              dst or self.gateway_ip, proto, len(l4))
        else:
            ipv4.build_header(head, vnet.HEADER_LEN + ethernet.HEADER_LEN, GUEST_IP,
                              dst or GATEWAY_IP, proto, len(l4))
        return bytes(head) + l4

    def _handshake(self) -> None:
        syn = self.frame(wtcp.SYN, self.guest_seq, 0,
                         options=wtcp.syn_options(mss=MSS, wscale=7))
        self.stack.receive_frame(memoryview(syn), self.now)
        call = self.host.last("tcp_connect")
        assert call is not None
        self.flow = call[1]
        self.flow.host_connected(self.now)
        synack = self.sink.last
        raw = b"".join(bytes(p) for p in synack)
        seg = wtcp.TcpSegment(memoryview(raw)[vnet.HEADER_LEN + 14 + (40 if self.ipv6 else 20):])
        self.guest_seq += 1
        ack = self.frame(wtcp.ACK, self.guest_seq, (seg.seq + 1) & 0xFFFFFFFF)
        self.stack.receive_frame(memoryview(ack), self.now)
        self.stack.flush(self.now)

    def upload_frame(self) -> bytes:
        """The next in-order 64 KB TSO super-frame from the guest."""
        data = self.frame(wtcp.ACK | wtcp.PSH, self.guest_seq, self.flow.snd_nxt, self.payload)
        self.guest_seq = (self.guest_seq + len(self.payload)) & 0xFFFFFFFF
        return data

    def upload(self, frame: bytes) -> None:
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)
        self.host.calls.clear()

    def host_data(self) -> None:
        """64 KB read from the host socket, out to the guest."""
        self.flow.host_data(self.payload, self.now)
        self.stack.flush(self.now)

    def ack_frame(self) -> bytes:
        """The guest's ACK for everything it was sent (slow start may hold some back)."""
        return self.frame(wtcp.ACK, self.guest_seq, self.flow.snd_nxt)

    def receive(self, frame: bytes) -> None:
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)
        self.host.calls.clear()

    def download(self) -> None:
        self.host_data()
        self.receive(self.ack_frame())

    # ---- small transactions ---------------------------------------------------------

    def ping_frame(self) -> bytes:
        """The guest's next 1-byte segment, acknowledging everything it was sent."""
        data = self.frame(wtcp.ACK | wtcp.PSH, self.guest_seq, self.flow.snd_nxt, b"x")
        self.guest_seq = (self.guest_seq + 1) & 0xFFFFFFFF
        return data

    def round_trip(self, ping: bytes) -> None:
        """One 1-byte exchange as netload.py rtt makes it: the guest's byte to the host
        (which acknowledges the echo sent before it), then the host's echo to the guest."""
        self.receive(ping)
        self.flow.host_data(b"x", self.now)
        self.stack.flush(self.now)

    def short_connection(self, port: int) -> Any:
        """One whole connection as netload.py connect makes it, from guest port ``port``:
        SYN, host connected, SYN-ACK, ACK, the guest's FIN with the host's EOF waiting
        (the server closed at once), our FIN, the guest's last ACK. Returns the flow."""
        seq = 5_000_000
        syn = self.frame(wtcp.SYN, seq, 0, options=wtcp.syn_options(mss=MSS, wscale=7),
                         port=port)
        self.stack.receive_frame(memoryview(syn), self.now)
        call = self.host.last("tcp_connect")
        assert call is not None
        flow = call[1]
        flow.host_connected(self.now)
        self.stack.flush(self.now)
        ours = self._last_tcp_segment()
        seq += 1
        ack = (ours.seq + 1) & 0xFFFFFFFF
        self.receive(self.frame(wtcp.ACK, seq, ack, port=port))
        self.stack.receive_frame(memoryview(self.frame(wtcp.ACK | wtcp.FIN, seq, ack,
                                                       port=port)), self.now)
        flow.host_eof(self.now)
        self.stack.flush(self.now)
        seq += 1
        self.receive(self.frame(wtcp.ACK, seq, (ack + 1) & 0xFFFFFFFF, port=port))
        return flow

    def idle_connection(self, port: int) -> Any:
        """One connection as netload.py hold makes it, from guest port ``port``: the
        handshake (MSS, window scale, SACK), the server's one byte to the guest and
        the guest's ACK of it; then nothing. Returns the flow, left idle."""
        seq = 6_000_000
        syn = self.frame(wtcp.SYN, seq, 0, port=port, options=wtcp.syn_options(
            mss=MSS, wscale=7, sack_permitted=True))
        self.stack.receive_frame(memoryview(syn), self.now)
        call = self.host.last("tcp_connect")
        assert call is not None
        flow = call[1]
        flow.host_connected(self.now)
        self.stack.flush(self.now)
        ours = self._last_tcp_segment()
        seq += 1
        ack = (ours.seq + 1) & 0xFFFFFFFF
        self.receive(self.frame(wtcp.ACK, seq, ack, port=port))
        flow.host_data(b"x", self.now)
        self.stack.flush(self.now)
        self.receive(self.frame(wtcp.ACK, seq, (ack + 1) & 0xFFFFFFFF, port=port))
        return flow

    def _last_tcp_segment(self) -> wtcp.TcpSegment:
        raw = b"".join(bytes(p) for p in self.sink.last)
        return wtcp.TcpSegment(memoryview(raw)[vnet.HEADER_LEN + 14 + (40 if self.ipv6 else 20):])

    def udp_frame(self, payload: bytes = b"x" * 64) -> bytes:
        """A datagram from the guest to the host's loopback (the gateway's UDP_PORT)."""
        dgram = wudp.build(GUEST_IP, UDP_GUEST_PORT, GATEWAY_IP, UDP_PORT, payload)
        return self._ip_frame(17, bytes(dgram))

    def udp_up(self, frame: bytes) -> Any:
        """The guest's datagram out to the host; returns the UDP flow it went on."""
        self.receive_udp(frame)
        call = self.host.last("udp_open")
        assert call is not None
        return call[1]

    def receive_udp(self, frame: bytes) -> None:
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)

    def dns_query_frame(self, query_id: int) -> bytes:
        """The guest's A query under ``query_id`` to the DNS address (IPv4's or IPv6's)."""
        dns_ip = self.config.dns6 if self.ipv6 else self.config.dns
        query = query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01" + bytes(6) + DNS_QUESTION
        build = wudp.build6 if self.ipv6 else wudp.build
        return self._ip_frame(17, bytes(build(self.guest_ip, DNS_GUEST_PORT, dns_ip, 53,
                                              query)), dns_ip)

    def dns_query(self, frame: bytes) -> bytes:
        """The guest's query in (as the TAP reader hands it over, flush included); returns
        what the forwarder sent upstream."""
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)
        call = self.host.calls[-1]
        assert call[0] == "dns_send", call
        self.host.calls.clear()
        sent: bytes = call[3]
        return sent

    def dns_answer(self, sent: bytes) -> None:
        """The upstream's answer to the query ``sent`` (its ID, QR + RA, one A record),
        read from the upstream's socket and handed to the forwarder."""
        answer = (sent[:2] + b"\x81\x80" + sent[4:6] + b"\x00\x01" + sent[8:] + DNS_ANSWER_RR)
        self.stack.dns.upstream_datagram(DNS_UPSTREAM, answer, self.now)
        self.host.calls.clear()

    def udp_down(self, flow: Any, payload: bytes = b"x" * 64) -> None:
        """The host's reply datagram, from the host's loopback port UDP_PORT, to the guest."""
        self.stack.udp.host_datagram(flow, "::1" if self.ipv6 else "127.0.0.1", UDP_PORT,
                                     payload, self.now)
        self.stack.flush(self.now)
