"""DhcpServer: what udhcpc- and dhclient-like clients see on the wire."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyslirp.stack.dhcp import DECLINE_HOLD
from pyslirp.wire import dhcp
from pyslirp.wire.ethernet import EthernetFrame
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.udp import UdpDatagram
from tests.stack.fakes import StackHarness
from tests.wire.test_dhcp import DHCLIENT_DISCOVER, UDHCPC_DISCOVER

MAC = bytes.fromhex("66696895ca9c")
BCAST_MAC = b"\xff" * 6
GW = "10.0.2.2"


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


@dataclass
class Reply:
    dst_mac: bytes
    src_ip: str
    dst_ip: str
    dst_port: int
    msg: dhcp.DhcpMessage

    @property
    def type(self) -> int | None:
        return self.msg.msg_type

    @property
    def yiaddr(self) -> str:
        return ".".join(map(str, self.msg.yiaddr))

    def opt(self, code: int) -> bytes | None:
        return self.msg.options.get(code)


class Harness(StackHarness):
    """The shared stack rig; client frames go straight to its DHCP server."""

    def __init__(self, **cfg: Any) -> None:
        super().__init__(**cfg)
        self.server = self.stack.dhcp

    def deliver(self, frame: bytes) -> list[Reply]:
        """Run one client frame through the server, return the decoded replies (which stay
        in ``frames``, as sent, until the next frame)."""
        self.sink.take()
        eth = EthernetFrame(memoryview(frame))
        pkt = Ipv4Packet(eth.payload)
        dgram = UdpDatagram(pkt.payload, pkt.src, pkt.dst, verify_checksum=True)
        self.server.handle(eth.src, pkt, dgram, self.now)
        out = []
        for f in self.frames:
            e = EthernetFrame(memoryview(f))
            p = Ipv4Packet(e.payload)  # verifies the IP checksum
            u = UdpDatagram(p.payload, p.src, p.dst, verify_checksum=True)
            assert u.src_port == 67
            out.append(Reply(e.dst, ".".join(map(str, p.src)), ".".join(map(str, p.dst)),
                             u.dst_port, dhcp.DhcpMessage(u.payload)))
        return out

    def one(self, frame: bytes) -> Reply:
        replies = self.deliver(frame)
        assert len(replies) == 1, replies
        return replies[0]


def udhcpc(kind: str, mac: bytes = MAC, xid: int = 0x1234, *, requested: str | None = None,
           server: str | None = None, ciaddr: str = "0.0.0.0", broadcast: bool = False,
           src: str = "0.0.0.0", dst: str = "255.255.255.255") -> bytes:
    """A message laid out as busybox udhcpc 1.35 sends it (see the captured DISCOVER)."""
    opts: list[object] = [("message-type", kind), ("max_dhcp_size", 576)]
    if requested:
        opts.append(("requested_addr", requested))
    if server:
        opts.append(("server_id", server))
    opts += [("param_req_list", [1, 3, 6, 12, 15, 28, 42]), ("vendor_class_id", b"udhcp 1.35.0"),
             ("client_id", b"\x01" + mac), "end"]
    return _frame(mac, xid, opts, ciaddr, broadcast, src, dst, ttl=64)


def dhclient(kind: str, mac: bytes = MAC, xid: int = 0x0EFEA17E, *,
             requested: str | None = None, server: str | None = None,
             ciaddr: str = "0.0.0.0", src: str = "0.0.0.0",
             dst: str = "255.255.255.255") -> bytes:
    """A message laid out as ISC dhclient 4.4 sends it (no client id, long PRL)."""
    opts: list[object] = [("message-type", kind)]
    if server:
        opts.append(("server_id", server))
    if requested:
        opts.append(("requested_addr", requested))
    opts += [("hostname", b"vm"),
             ("param_req_list", [1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]), "end"]
    return _frame(mac, xid, opts, ciaddr, False, src, dst, ttl=128)


def _frame(mac: bytes, xid: int, opts: list[object], ciaddr: str, broadcast: bool, src: str,
           dst: str, ttl: int) -> bytes:
    dst_mac = "ff:ff:ff:ff:ff:ff" if dst == "255.255.255.255" else "52:55:0a:00:02:02"
    pkt = (Ether(src=mac.hex(":"), dst=dst_mac) / IP(src=src, dst=dst, ttl=ttl)
           / UDP(sport=68, dport=67)
           / BOOTP(op=1, chaddr=mac + bytes(10), xid=xid, ciaddr=ciaddr,
                   flags=0x8000 if broadcast else 0)
           / DHCP(options=opts))
    return bytes(pkt)


def check_lease_options(r: Reply, h: Harness) -> None:
    assert r.opt(dhcp.OPT_SERVER_ID) == ip(GW)
    assert r.opt(dhcp.OPT_SUBNET_MASK) == ip("255.255.255.0")
    assert r.opt(dhcp.OPT_ROUTER) == ip(GW)
    assert r.opt(dhcp.OPT_DNS) == ip("10.0.2.3")
    assert r.opt(dhcp.OPT_MTU) == (1500).to_bytes(2, "big")
    assert r.opt(dhcp.OPT_LEASE_TIME) == (86400).to_bytes(4, "big")
    assert r.opt(dhcp.OPT_RENEWAL_TIME) == (43200).to_bytes(4, "big")
    assert r.opt(dhcp.OPT_REBINDING_TIME) == (75600).to_bytes(4, "big")


# ---- full exchanges -------------------------------------------------------------


def test_udhcpc_exchange_with_captured_discover() -> None:
    h = Harness()
    offer = h.one(UDHCPC_DISCOVER)
    assert offer.type == dhcp.OFFER
    assert offer.yiaddr == "10.0.2.15"
    assert offer.msg.xid == 0x9C2A2922 and offer.msg.chaddr == MAC
    # No broadcast flag, no ciaddr: unicast to the offered address and the client's MAC.
    assert (offer.dst_mac, offer.src_ip, offer.dst_ip, offer.dst_port) == (
        MAC, GW, "10.0.2.15", 68)
    check_lease_options(offer, h)
    assert offer.opt(dhcp.OPT_CLIENT_ID) == b"\x01" + MAC  # echoed, RFC 6842

    ack = h.one(udhcpc("request", xid=0x9C2A2922, requested="10.0.2.15", server=GW))
    assert ack.type == dhcp.ACK and ack.yiaddr == "10.0.2.15"
    check_lease_options(ack, h)
    assert h.server.lease_of(MAC, h.now) == ip("10.0.2.15")

    # Renewal: unicast from the leased address, ciaddr set, no option 50/54.
    h.now += 43200
    renew = h.one(udhcpc("request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW))
    assert renew.type == dhcp.ACK and renew.yiaddr == "10.0.2.15"
    assert (renew.dst_mac, renew.dst_ip) == (MAC, "10.0.2.15")
    # The renewal extended the lease past the original expiry.
    assert h.server.lease_of(MAC, h.now + 86400 - 1) == ip("10.0.2.15")


def test_offer_option_bytes() -> None:
    h = Harness()
    h.one(UDHCPC_DISCOVER)
    frame = h.frames[0]
    options = frame[14 + 20 + 8 + 240:]
    expected = bytes.fromhex(
        "350102"            # message type OFFER
        "36040a000202"      # server identifier
        "0104ffffff00"      # subnet mask
        "03040a000202"      # router
        "06040a000203"      # DNS
        "1a0205dc"          # interface MTU 1500
        "1c040a0002ff"      # broadcast address
        "330400015180"      # lease 86400 s
        "3a040000a8c0"      # T1 43200 s
        "3b0400012750"      # T2 75600 s
        "3d0701" + MAC.hex() +  # client identifier echoed
        "ff")
    assert options[:len(expected)] == expected
    assert options[len(expected):] == bytes(len(options) - len(expected))  # padding
    assert len(frame) - 42 >= 300  # BOOTP minimum size


def test_dhclient_exchange_with_captured_discover_and_search_domains() -> None:
    h = Harness(search_domains=["corp.example.com", "example.com"])
    offer = h.one(DHCLIENT_DISCOVER)
    assert offer.type == dhcp.OFFER and offer.yiaddr == "10.0.2.15"
    assert offer.opt(dhcp.OPT_DOMAIN_NAME) == b"corp.example.com"
    assert offer.opt(dhcp.OPT_CLIENT_ID) is None
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) == (
        b"\x04corp\x07example\x03com\x00\xc0\x05")
    ack = h.one(dhclient("request", requested="10.0.2.15", server=GW))
    assert ack.type == dhcp.ACK and ack.yiaddr == "10.0.2.15"
    check_lease_options(ack, h)
    # scapy decodes the ACK the way a client would.
    pkt = BOOTP(bytes(h.frames[0][42:]))
    opts = dict(o for o in pkt[DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 5 and opts["router"] == GW
    assert opts["name_server"] == "10.0.2.3" and opts["interface-mtu"] == 1500


def test_broadcast_flag_gets_broadcast_reply() -> None:
    h = Harness()
    offer = h.one(udhcpc("discover", broadcast=True))
    assert (offer.dst_mac, offer.dst_ip) == (BCAST_MAC, "255.255.255.255")
    assert offer.msg.broadcast
    ack = h.one(udhcpc("request", requested=offer.yiaddr, server=GW, broadcast=True))
    assert (ack.type, ack.dst_mac, ack.dst_ip) == (dhcp.ACK, BCAST_MAC, "255.255.255.255")


def test_relayed_discover_is_answered_to_the_relay() -> None:
    h = Harness()
    relay_mac = bytes.fromhex("020000000099")
    payload = dhcp.build(dhcp.BOOTREQUEST, 5, MAC, [(53, b"\x01")], giaddr=ip("10.0.2.50"),
                         hops=1)
    frame = bytes(Ether(dst="52:55:0a:00:02:02", src=relay_mac.hex(":"))
                  / IP(src="10.0.2.50", dst=GW) / UDP(sport=67, dport=67) / bytes(payload))
    offer = h.one(frame)
    assert (offer.dst_mac, offer.dst_ip, offer.dst_port) == (relay_mac, "10.0.2.50", 67)
    assert offer.msg.giaddr == ip("10.0.2.50") and offer.yiaddr == "10.0.2.15"


def test_options_follow_config() -> None:
    h = Harness(disable_dns=True, mtu=65520, dhcp_lease_seconds=3600)
    offer = h.one(udhcpc("discover"))
    assert offer.opt(dhcp.OPT_DNS) is None
    assert offer.opt(dhcp.OPT_MTU) == (65520).to_bytes(2, "big")
    assert offer.opt(dhcp.OPT_LEASE_TIME) == (3600).to_bytes(4, "big")
    assert offer.opt(dhcp.OPT_RENEWAL_TIME) == (1800).to_bytes(4, "big")
    assert offer.opt(dhcp.OPT_REBINDING_TIME) == (3150).to_bytes(4, "big")
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) is None


def test_other_network() -> None:
    import ipaddress
    h = Harness(network=ipaddress.IPv4Network("192.168.77.0/24"))
    offer = h.one(udhcpc("discover"))
    assert offer.yiaddr == "192.168.77.15" and offer.src_ip == "192.168.77.2"
    assert offer.opt(dhcp.OPT_ROUTER) == ip("192.168.77.2")
    assert offer.opt(dhcp.OPT_DNS) == ip("192.168.77.3")


def test_search_domains_changed_after_start_are_served() -> None:
    # The runtime fills config.search_domains from resolv.conf after the stack exists.
    h = Harness()
    assert h.one(udhcpc("discover")).opt(dhcp.OPT_DOMAIN_SEARCH) is None
    h.config.search_domains[:] = ["lab.example"]
    offer = h.one(udhcpc("discover"))
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) == b"\x03lab\x07example\x00"
    assert offer.opt(dhcp.OPT_DOMAIN_NAME) == b"lab.example"


BAD_DOMAINS = [
    ("\ufffdcorp.example", "not a valid internationalised name"),  # resolv.conf not UTF-8
    ("a..example", "0 bytes long"),
    ("x" * 64 + ".example", "64 bytes long"),
    ("evil.example\nnameserver", "characters other than"),
    (".", "root domain"),
]


@pytest.mark.parametrize(("bad", "why"), BAD_DOMAINS)
def test_bad_search_domain_is_skipped_with_a_warning_and_the_rest_served(
        bad: str, why: str, caplog: pytest.LogCaptureFixture) -> None:
    # One bad name used to raise out of the server, and every later OFFER carried
    # option 53 only.
    caplog.set_level(logging.WARNING, logger="pyslirp")
    h = Harness(search_domains=[bad, "good.example"])
    assert [r for r in caplog.records if repr(bad) in r.getMessage() and why in r.getMessage()]
    for xid in (1, 2):
        offer = h.one(dhclient("discover", xid=xid))
        assert offer.type == dhcp.OFFER and offer.yiaddr == "10.0.2.15"
        check_lease_options(offer, h)
        assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) == b"\x04good\x07example\x00"
        assert offer.opt(dhcp.OPT_DOMAIN_NAME) == b"good.example"


def test_bad_search_domain_set_after_start_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    # A runtime that fills the list in place without validating it first.
    caplog.set_level(logging.WARNING, logger="pyslirp")
    h = Harness()
    h.config.search_domains[:] = ["\ufffd.example", "lab.example"]
    offer = h.one(udhcpc("discover"))
    check_lease_options(offer, h)
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) == b"\x03lab\x07example\x00"
    assert "'\ufffd.example'" in caplog.text


def test_international_search_domain_is_served_in_idna_form() -> None:
    h = Harness(search_domains=["\u00e9t\u00e9.example"])
    offer = h.one(udhcpc("discover"))
    assert offer.opt(dhcp.OPT_DOMAIN_NAME) == b"xn--t-9fab.example"
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) == b"\x0axn--t-9fab\x07example\x00"


def test_search_list_left_out_when_too_big_for_client() -> None:
    domains = [f"{'x' * 50}{i}.example{i}" for i in range(8)]
    h = Harness(search_domains=domains)
    offer = h.one(udhcpc("discover"))  # udhcpc says 576 bytes max
    assert offer.opt(dhcp.OPT_DOMAIN_SEARCH) is None
    assert offer.opt(dhcp.OPT_DOMAIN_NAME) == domains[0].encode()
    assert h.link.counters["dhcp.search_list_omitted"] == 1


# ---- address choice ---------------------------------------------------------------


def test_requested_address_in_pool_is_honoured() -> None:
    h = Harness()
    assert h.one(udhcpc("discover", requested="10.0.2.20")).yiaddr == "10.0.2.20"
    h2 = Harness()
    # Outside the pool (the --configure address, the gateway): the first free one instead.
    assert h2.one(udhcpc("discover", requested="10.0.2.100")).yiaddr == "10.0.2.15"
    assert h2.one(udhcpc("discover", mac=b"\x02" * 6, requested=GW)).yiaddr == "10.0.2.16"


def test_same_client_gets_same_address_and_others_differ() -> None:
    h = Harness()
    a = h.one(udhcpc("discover")).yiaddr
    b = h.one(dhclient("discover", mac=b"\x02" * 6)).yiaddr
    assert a != b
    assert h.one(udhcpc("discover")).yiaddr == a


def bind(h: Harness, mac: bytes) -> str:
    offer = h.one(udhcpc("discover", mac=mac))
    ack = h.one(udhcpc("request", mac=mac, requested=offer.yiaddr, server=GW))
    assert ack.type == dhcp.ACK
    return ack.yiaddr


def test_pool_exhaustion_then_release_and_reuse() -> None:
    h = Harness()
    macs = [bytes([2, 0, 0, 0, 0, i]) for i in range(17)]
    addrs = [bind(h, m) for m in macs[:16]]
    assert addrs == [f"10.0.2.{15 + i}" for i in range(16)]
    assert h.deliver(udhcpc("discover", mac=macs[16])) == []
    assert h.link.counters["dhcp.pool_exhausted"] == 1

    # The 4th client releases its address; the newcomer gets exactly that one.
    h.deliver(udhcpc("release", mac=macs[3], ciaddr=addrs[3], server=GW, src=addrs[3], dst=GW))
    assert h.link.counters["dhcp.release"] == 1
    assert h.one(udhcpc("discover", mac=macs[16])).yiaddr == addrs[3]


def test_release_then_same_client_returns_to_its_address() -> None:
    h = Harness()
    a = bind(h, MAC)
    h.deliver(udhcpc("release", ciaddr=a, server=GW, src=a, dst=GW))
    assert h.server.lease_of(MAC, h.now) is None
    bind(h, b"\x02" * 6)  # takes a never-used address, not the released one
    assert bind(h, MAC) == a


def test_expired_lease_is_reused_when_pool_is_full() -> None:
    h = Harness(dhcp_lease_seconds=600)
    for i in range(16):
        bind(h, bytes([2, 0, 0, 0, 0, i]))
    h.now += 601
    assert h.one(udhcpc("discover", mac=b"\x04" * 6)).yiaddr == "10.0.2.15"


def test_unanswered_offer_is_reserved_then_freed() -> None:
    h = Harness(dhcp_pool_size=1)
    assert h.one(udhcpc("discover")).yiaddr == "10.0.2.15"
    assert h.deliver(udhcpc("discover", mac=b"\x02" * 6)) == []
    h.now += 61
    assert h.one(udhcpc("discover", mac=b"\x02" * 6)).yiaddr == "10.0.2.15"


# ---- NAK and other servers ------------------------------------------------------


@pytest.mark.parametrize("addr", ["192.168.1.50", "10.0.2.2", "10.0.2.100", "10.0.2.31"])
def test_init_reboot_for_foreign_address_is_nakked(addr: str) -> None:
    h = Harness()
    nak = h.one(dhclient("request", requested=addr))
    assert nak.type == dhcp.NAK
    assert (nak.dst_mac, nak.dst_ip) == (BCAST_MAC, "255.255.255.255")
    assert nak.yiaddr == "0.0.0.0"
    assert nak.opt(dhcp.OPT_SERVER_ID) == ip(GW)
    assert nak.opt(dhcp.OPT_LEASE_TIME) is None
    assert h.server.lease_of(MAC, h.now) is None


def test_init_reboot_for_free_pool_address_is_acked() -> None:
    # A guest that kept its lease across a restart of pyslirp keeps its address.
    h = Harness()
    ack = h.one(dhclient("request", requested="10.0.2.22"))
    assert ack.type == dhcp.ACK and ack.yiaddr == "10.0.2.22"
    assert h.server.lease_of(MAC, h.now) == ip("10.0.2.22")


def test_request_for_address_leased_to_another_is_nakked() -> None:
    h = Harness()
    a = bind(h, b"\x02" * 6)
    assert h.one(udhcpc("request", requested=a, server=GW)).type == dhcp.NAK
    # Renewing someone else's address from ciaddr: NAK as well, broadcast.
    nak = h.one(udhcpc("request", ciaddr=a, src=a, dst=GW))
    assert nak.type == dhcp.NAK and nak.dst_ip == "255.255.255.255"


def test_request_to_other_server_frees_our_offer() -> None:
    h = Harness(dhcp_pool_size=1)
    assert h.one(udhcpc("discover")).yiaddr == "10.0.2.15"
    assert h.deliver(udhcpc("request", requested="10.0.2.15", server="10.9.9.9")) == []
    assert h.one(udhcpc("discover", mac=b"\x02" * 6)).yiaddr == "10.0.2.15"


def test_decline_takes_address_out_of_pool_for_a_while() -> None:
    h = Harness()
    a = bind(h, MAC)
    assert h.deliver(dhclient("decline", requested=a, server=GW)) == []
    assert h.link.counters["dhcp.decline"] == 1
    second = h.one(udhcpc("discover"))
    assert second.yiaddr != a
    # Nobody gets it, even by asking for it.
    assert h.one(dhclient("request", mac=b"\x02" * 6, requested=a)).type == dhcp.NAK
    h.now += DECLINE_HOLD + 1
    assert h.one(dhclient("request", mac=b"\x02" * 6, requested=a)).type == dhcp.ACK


def test_decline_from_another_client_does_not_take_a_guests_address() -> None:
    h = Harness()
    h.one(udhcpc("discover"))
    assert h.one(udhcpc("request", requested="10.0.2.15", server=GW)).type == dhcp.ACK
    other = b"\x02" * 6
    assert h.deliver(udhcpc("decline", mac=other, requested="10.0.2.15", server=GW)) == []
    h.now += 100
    renew = h.one(udhcpc("request", ciaddr="10.0.2.15", src="10.0.2.15", dst=GW))
    assert renew.type == dhcp.ACK and renew.yiaddr == "10.0.2.15"  # was a NAK
    assert h.link.counters["dhcp.drop.decline_not_holder"] == 1


def test_inform_gets_configuration_without_lease() -> None:
    h = Harness()
    ack = h.one(dhclient("inform", ciaddr="10.0.2.100", src="10.0.2.100", dst=GW))
    assert ack.type == dhcp.ACK
    assert ack.yiaddr == "0.0.0.0"
    assert (ack.dst_mac, ack.dst_ip) == (MAC, "10.0.2.100")
    assert ack.opt(dhcp.OPT_LEASE_TIME) is None
    assert ack.opt(dhcp.OPT_ROUTER) == ip(GW)
    assert h.server.leases() == []


# ---- bad input --------------------------------------------------------------------


def _with_payload(payload: bytes) -> bytes:
    return bytes(Ether(src=MAC.hex(":"), dst="ff:ff:ff:ff:ff:ff")
                 / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / payload)


@pytest.mark.parametrize("payload, counter", [
    (b"", "dhcp.drop.malformed"),
    (bytes(UDHCPC_DISCOVER[42:200]), "dhcp.drop.malformed"),
    (bytes(UDHCPC_DISCOVER[42:]).replace(b"\x63\x82\x53\x63", b"\x00" * 4),
     "dhcp.drop.malformed"),
    (b"\x02" + bytes(UDHCPC_DISCOVER[43:]), "dhcp.drop.not_request"),
    (bytes(UDHCPC_DISCOVER[42:44]) + b"\x10" + bytes(UDHCPC_DISCOVER[45:]),
     "dhcp.drop.not_ethernet"),
    (bytes(dhcp.build(1, 1, MAC, [])), "dhcp.drop.bad_type"),
    (bytes(dhcp.build(1, 1, MAC, [(53, b"\x02")])), "dhcp.drop.bad_type"),
    (bytes(dhcp.build(1, 1, MAC, [(53, b"\x03")])), "dhcp.drop.request_without_address"),
    (bytes(dhcp.build(1, 1, MAC, [(53, b"\x08")])), "dhcp.drop.inform_without_ciaddr"),
    (bytes(dhcp.build(1, 1, MAC, [(53, b"\x07")], ciaddr=ip("10.0.2.15"))),
     "dhcp.drop.release_unknown"),
])
def test_bad_messages_are_dropped_and_counted(payload: bytes, counter: str) -> None:
    h = Harness()
    assert h.deliver(_with_payload(payload)) == []
    assert h.link.counters[counter] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 8))
def test_random_options_never_raise(tail: bytes, kind: int) -> None:
    h = Harness()
    head = bytes(dhcp.build(1, 1, MAC, [(53, bytes([kind]))]))[:243]
    h.deliver(_with_payload(head + tail))  # replies or not, but no exception
