"""DHCP wire format: real client messages, round trips, option splitting, bad input."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.l2 import Ether

from pyslirp.wire import dhcp
from pyslirp.wire.errors import MalformedPacket

# Captured from the Debian 12 clients on a veth (Ethernet frames, broadcast DISCOVERs).
UDHCPC_DISCOVER = bytes.fromhex(
    "ffffffffffff66696895ca9c08004500014800000000401179a600000000ffffffff0044004301343e55"
    "010106009c2a2922000000000000000000000000000000000000000066696895ca9c" + "00" * 202 +
    "638253633501013902024037070103060c0f1c2a3c0c756468637020312e33352e303d070166696895ca9c"
    "ff" + "00" * 20)
DHCLIENT_DISCOVER = bytes.fromhex(
    "ffffffffffff66696895ca9c080045100148000000008011399600000000ffffffff004400430134694b"
    "010106000efea17e000000000000000000000000000000000000000066696895ca9c" + "00" * 202 +
    "638253633501010c02766d370d011c02030f06770c2c2f1a792aff" + "00" * 37)
MAC = bytes.fromhex("66696895ca9c")


def _dhcp_payload(frame: bytes) -> memoryview:
    return memoryview(frame)[14 + 20 + 8:]


def test_captures_are_what_scapy_sees() -> None:
    # Guards the fixtures themselves: both are well-formed DISCOVERs.
    for frame in (UDHCPC_DISCOVER, DHCLIENT_DISCOVER):
        pkt = Ether(frame)
        assert pkt[DHCP].options[0] == ("message-type", 1)


def test_parse_udhcpc_discover() -> None:
    msg = dhcp.DhcpMessage(_dhcp_payload(UDHCPC_DISCOVER))
    assert msg.op == dhcp.BOOTREQUEST
    assert (msg.htype, msg.hlen, msg.xid) == (1, 6, 0x9C2A2922)
    assert msg.chaddr == MAC
    assert msg.msg_type == dhcp.DISCOVER
    assert msg.client_id == b"\x01" + MAC
    assert msg.param_request_list == bytes([1, 3, 6, 12, 15, 28, 42])
    assert msg.options[dhcp.OPT_VENDOR_CLASS] == b"udhcp 1.35.0"
    assert msg.max_message_size == 576 - 28
    assert not msg.broadcast
    assert msg.requested_ip is None and msg.server_id is None
    assert msg.ciaddr == bytes(4)


def test_parse_dhclient_discover() -> None:
    msg = dhcp.DhcpMessage(_dhcp_payload(DHCLIENT_DISCOVER))
    assert msg.msg_type == dhcp.DISCOVER
    assert msg.client_id is None
    assert msg.options[dhcp.OPT_HOSTNAME] == b"vm"
    assert dhcp.OPT_DOMAIN_SEARCH in msg.param_request_list
    assert msg.max_message_size == dhcp.DEFAULT_MAX_MESSAGE_LEN


def test_build_is_read_back_by_scapy() -> None:
    out = dhcp.build(dhcp.BOOTREPLY, 0x01020304, MAC,
                     [(dhcp.OPT_MESSAGE_TYPE, b"\x02"), (dhcp.OPT_SERVER_ID, bytes([10, 0, 2, 2])),
                      (dhcp.OPT_LEASE_TIME, (3600).to_bytes(4, "big"))],
                     flags=dhcp.FLAG_BROADCAST, yiaddr=bytes([10, 0, 2, 15]))
    assert len(out) == dhcp.MIN_MESSAGE_LEN
    pkt = BOOTP(bytes(out))
    assert pkt.op == 2 and pkt.xid == 0x01020304 and pkt.flags == 0x8000
    assert pkt.yiaddr == "10.0.2.15"
    assert pkt.chaddr[:6] == MAC
    opts = dict(o for o in pkt[DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 2
    assert opts["server_id"] == "10.0.2.2"
    assert opts["lease_time"] == 3600
    # Option bytes exactly: type, server id, lease, END, then padding.
    assert out[240:256] == bytes.fromhex("350102 36040a000202 33040000 0e10 ff".replace(" ", ""))
    assert out[256:] == bytes(len(out) - 256)


def test_round_trip_fields() -> None:
    out = dhcp.build(dhcp.BOOTREQUEST, 7, MAC, [(dhcp.OPT_MESSAGE_TYPE, b"\x03"),
                                                (dhcp.OPT_REQUESTED_IP, b"\x0a\x00\x02\x14")],
                     ciaddr=b"\x0a\x00\x02\x0f", giaddr=b"\x01\x02\x03\x04", secs=9)
    msg = dhcp.DhcpMessage(out)
    assert (msg.xid, msg.secs, msg.ciaddr, msg.giaddr) == (7, 9, b"\x0a\x00\x02\x0f",
                                                           b"\x01\x02\x03\x04")
    assert msg.requested_ip == b"\x0a\x00\x02\x14"
    assert msg.msg_type == dhcp.REQUEST


def test_long_option_is_split_and_rejoined() -> None:
    value = bytes(range(256)) * 2  # 512 bytes: three instances of 255, 255, 2
    enc = dhcp.encode_options([(dhcp.OPT_DOMAIN_SEARCH, value)])
    assert enc[0:2] == bytes([119, 255]) and enc[257:259] == bytes([119, 255])
    assert enc[514:516] == bytes([119, 2]) and enc[-1] == dhcp.OPT_END
    msg = dhcp.DhcpMessage(dhcp.build(dhcp.BOOTREPLY, 1, MAC, [(dhcp.OPT_DOMAIN_SEARCH, value)]))
    assert msg.options[dhcp.OPT_DOMAIN_SEARCH] == value


def test_overloaded_file_field_is_parsed() -> None:
    out = dhcp.build(dhcp.BOOTREQUEST, 1, MAC, [(dhcp.OPT_MESSAGE_TYPE, b"\x01"),
                                                (dhcp.OPT_OVERLOAD, b"\x01")])
    out[108:115] = bytes([50, 4, 10, 0, 2, 20, 255])  # option 50 inside 'file'
    msg = dhcp.DhcpMessage(out)
    assert msg.requested_ip == bytes([10, 0, 2, 20])


def test_pad_and_missing_end_are_tolerated() -> None:
    out = bytearray(dhcp.build(dhcp.BOOTREQUEST, 1, MAC, []))
    del out[240:]
    out += bytes([0, 0, 53, 1, 1])  # padding, then a type option running to the end
    assert dhcp.DhcpMessage(out).msg_type == dhcp.DISCOVER


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b[:239], "shorter"),
    (lambda b: b[:236] + b"\x00\x00\x00\x00" + b[240:], "cookie"),
    (lambda b: b[:240] + bytes([53, 5, 1]), "truncated option"),
    (lambda b: b[:240] + bytes([53]), "no length"),
    (lambda b: b[:2] + bytes([17]) + b[3:], "hardware address length"),
    (lambda b: b[:240] + bytes([52, 1, 7, 255]), "overload"),
])
def test_malformed(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    good = bytes(dhcp.build(dhcp.BOOTREQUEST, 1, MAC, [(dhcp.OPT_MESSAGE_TYPE, b"\x01")]))
    with pytest.raises(MalformedPacket, match=reason):
        dhcp.DhcpMessage(mutate(good))


def test_bad_type_and_address_options_read_as_absent() -> None:
    msg = dhcp.DhcpMessage(dhcp.build(dhcp.BOOTREQUEST, 1, MAC, [
        (dhcp.OPT_MESSAGE_TYPE, b"\x01\x02"), (dhcp.OPT_REQUESTED_IP, b"\x0a\x00")]))
    assert msg.msg_type is None
    assert msg.requested_ip is None


def test_domain_search_rfc3397_example() -> None:
    # RFC 3397 section 2: "eng.apple.com." and "marketing.apple.com."
    assert dhcp.encode_domain_search(["eng.apple.com.", "marketing.apple.com"]) == bytes.fromhex(
        "03656e67056170706c6503636f6d00" "096d61726b6574696e67c004")


def test_domain_search_whole_name_repeated_and_case() -> None:
    enc = dhcp.encode_domain_search(["Example.org", "example.ORG"])
    assert enc == b"\x07Example\x03org\x00\xc0\x00"


@pytest.mark.parametrize("bad", ["a..b", "x" * 64 + ".com", ".".join(["abcdefghi"] * 30)])
def test_domain_search_rejects_invalid_names(bad: str) -> None:
    with pytest.raises(ValueError):
        dhcp.encode_domain_search([bad])
