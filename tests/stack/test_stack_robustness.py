"""Stack.receive_frame under hostile or buggy input: it never raises, never sends a frame
past the MTU, and keeps serving the next guest."""

from __future__ import annotations

import logging

import pytest

from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import Link
from pyslirp.stack.stack import ERROR_LOG_INTERVAL, Stack
from pyslirp.wire import arp, dhcp, ethernet, ipv4
from pyslirp.wire import udp as wire_udp
from pyslirp.wire.ethernet import EthernetFrame
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.udp import UdpDatagram
from tests.stack.fakes import CaptureSink, FakeHost

MAC = bytes.fromhex("020000000015")
OTHER_MAC = bytes.fromhex("020000000016")
ZERO = bytes(4)
LIMITED_BROADCAST = b"\xff" * 4


def udp_frame(src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int,
              payload: bytes | bytearray, dst_mac: bytes = ethernet.BROADCAST) -> bytes:
    """A plain (no vnet header) Ethernet frame carrying one UDP datagram, of any size."""
    datagram = wire_udp.build(src, sport, dst, dport, payload)
    head = bytearray(ipv4.MIN_HEADER_LEN)
    ipv4.build_header(head, 0, src, dst, wire_udp.PROTO, len(datagram))
    return ethernet.header(dst_mac, src_mac, ethernet.ETHERTYPE_IPV4) + bytes(head) + datagram


def discover(mac: bytes = MAC, client_id: bytes | None = None, xid: int = 0x1234) -> bytes:
    options = [(dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.DISCOVER,)))]
    if client_id is not None:
        options.append((dhcp.OPT_CLIENT_ID, client_id))
    payload = dhcp.build(dhcp.BOOTREQUEST, xid, mac, options)
    return udp_frame(mac, ZERO, LIMITED_BROADCAST, dhcp.CLIENT_PORT, dhcp.SERVER_PORT, payload)


def arp_request(mac: bytes = MAC, target: bytes = bytes([10, 0, 2, 2])) -> bytes:
    body = arp.build(arp.OP_REQUEST, mac, bytes([10, 0, 2, 15]), bytes(6), target)
    return ethernet.header(ethernet.BROADCAST, mac, ethernet.ETHERTYPE_ARP) + body


class Rig:
    def __init__(self, **cfg: object) -> None:
        self.config = NetConfig(vnet_hdr=False, offload=False, **cfg)  # type: ignore[arg-type]
        self.sink = CaptureSink()
        self.stack = Stack(self.config, self.sink, FakeHost())
        self.now = 1000.0

    def send(self, frame: bytes) -> list[bytes]:
        """One frame in, then the end of the batch (as the runtime does); the frames
        sent in answer (each checked against the MTU)."""
        self.stack.receive_frame(memoryview(frame), self.now)
        self.stack.flush(self.now)
        out = self.sink.take()
        for f in out:
            assert len(f) - ethernet.HEADER_LEN <= self.config.mtu
        return out

    def offers(self, frame: bytes) -> list[dhcp.DhcpMessage]:
        replies = []
        for f in self.send(frame):
            ip = Ipv4Packet(EthernetFrame(memoryview(f)).payload)
            udp = UdpDatagram(ip.payload, ip.src, ip.dst, verify_checksum=True)
            replies.append(dhcp.DhcpMessage(udp.payload))
        return replies


def assert_full_offer(msg: dhcp.DhcpMessage, cfg: NetConfig) -> None:
    assert msg.msg_type == dhcp.OFFER
    assert msg.options[dhcp.OPT_SERVER_ID] == cfg.gateway
    assert msg.options[dhcp.OPT_SUBNET_MASK] == cfg.netmask
    assert msg.options[dhcp.OPT_ROUTER] == cfg.gateway
    assert msg.options[dhcp.OPT_DNS] == cfg.dns
    assert msg.options[dhcp.OPT_MTU] == cfg.mtu.to_bytes(2, "big")
    assert msg.options[dhcp.OPT_BROADCAST] == cfg.broadcast
    assert dhcp.OPT_LEASE_TIME in msg.options


# ---- DHCP options the client sizes ------------------------------------------------


@pytest.mark.parametrize("size", [8 * 1024, 64750])
def test_discover_with_huge_client_id_gets_a_reply_that_fits_the_link(size: int) -> None:
    # 64,750 bytes once raised struct.error (the echo made the reply too big for UDP);
    # 8 KB made an 8,414-byte OFFER on a 1,500-byte link.
    rig = Rig()
    [offer] = rig.offers(discover(client_id=b"\x01" + bytes(size - 1)))
    assert_full_offer(offer, rig.config)
    assert dhcp.OPT_CLIENT_ID not in offer.options
    assert rig.stack.counters["dhcp.client_id_not_echoed"] == 1
    assert not [c for c in rig.stack.counters if c.startswith("stack.error.")]
    # The next client, an ordinary one, gets a full OFFER with its client id echoed.
    [offer] = rig.offers(discover(OTHER_MAC, client_id=b"\x01" + OTHER_MAC, xid=7))
    assert_full_offer(offer, rig.config)
    assert offer.xid == 7 and offer.chaddr == OTHER_MAC
    assert offer.options[dhcp.OPT_CLIENT_ID] == b"\x01" + OTHER_MAC


def test_client_id_of_one_full_option_is_echoed() -> None:
    rig = Rig()
    client_id = b"\xff" + bytes(range(254))
    [offer] = rig.offers(discover(client_id=client_id))
    assert offer.options[dhcp.OPT_CLIENT_ID] == client_id


def test_reply_too_big_for_the_link_is_dropped_and_counted() -> None:
    # A DHCP reply is at least 328 bytes of IP: on a 300-byte link it cannot be sent.
    rig = Rig(mtu=300)
    assert rig.offers(discover()) == []
    assert rig.stack.counters["drop.tx.over_mtu"] == 1


def test_search_list_left_out_when_it_would_not_fit_the_mtu() -> None:
    domains = [f"{'x' * 50}{i}.example" for i in range(20)]  # ~1 KB compressed
    rig = Rig(mtu=576, search_domains=domains)
    # The client would take up to 1,500 bytes, but the link carries only 576.
    options = [(dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.DISCOVER,))),
               (dhcp.OPT_MAX_MESSAGE_SIZE, (1500).to_bytes(2, "big"))]
    payload = dhcp.build(dhcp.BOOTREQUEST, 1, MAC, options)
    frame = udp_frame(MAC, ZERO, LIMITED_BROADCAST, 68, 67, payload)
    [offer] = rig.offers(frame)
    assert_full_offer(offer, rig.config)
    assert dhcp.OPT_DOMAIN_SEARCH not in offer.options
    assert rig.stack.counters["dhcp.search_list_omitted"] == 1


def test_link_never_sends_an_ipv4_packet_past_the_mtu() -> None:
    sink = CaptureSink()
    link = Link(NetConfig(vnet_hdr=False, mtu=1500), sink)
    src, dst = bytes([10, 0, 2, 2]), bytes([10, 0, 2, 15])
    assert link.send_ipv4(src, dst, 17, bytes(1480), dst_mac=MAC)
    assert not link.send_ipv4(src, dst, 17, bytes(1481), dst_mac=MAC)
    assert [len(f) for f in sink.take()] == [14 + 1500]
    assert link.counters["drop.tx.over_mtu"] == 1


# ---- containment of unexpected exceptions -------------------------------------------


def test_engine_exception_is_contained_counted_and_logged_rate_limited(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()

    def broken(*_args: object) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(rig.stack.dhcp, "handle", broken)
    caplog.set_level(logging.ERROR, logger="pyslirp")
    for dt in (0.0, 1.0, 2.0, ERROR_LOG_INTERVAL + 0.5):
        rig.now = 1000.0 + dt
        assert rig.send(discover()) == []
        # Other traffic is served meanwhile.
        assert len(rig.send(arp_request())) == 1
    assert rig.stack.counters["stack.error.KeyError"] == 4
    logged = [r for r in caplog.records if "KeyError" in r.getMessage()]
    assert len(logged) == 2  # the first, and the first after the interval
    assert all(r.exc_info is not None for r in logged)
    assert "2 more not logged" in logged[1].getMessage()
    # Once the engine works again, DHCP is served as before.
    monkeypatch.undo()
    [offer] = rig.offers(discover())
    assert_full_offer(offer, rig.config)


def test_each_exception_type_has_its_own_rate_limit(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    errors: list[Exception] = [ValueError("a"), TypeError("b"), ValueError("c")]

    def broken(*_args: object) -> None:
        raise errors.pop(0)

    monkeypatch.setattr(rig.stack.dhcp, "handle", broken)
    caplog.set_level(logging.ERROR, logger="pyslirp")
    for _ in range(3):
        rig.send(discover())
    counters = rig.stack.counters
    assert (counters["stack.error.ValueError"], counters["stack.error.TypeError"]) == (2, 1)
    assert len([r for r in caplog.records if r.exc_info]) == 2
