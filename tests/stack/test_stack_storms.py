"""Floods at the stack's front door (many UDP flows, ARP for random addresses, DHCP from
many MACs): state stays bounded, excess is counted, and a normal guest is still served."""

from __future__ import annotations

import random

from pyslirp.stack.dhcp import OFFER_HOLD
from pyslirp.wire import dhcp
from tests.stack.test_stack_robustness import (
    LIMITED_BROADCAST,
    MAC,
    ZERO,
    Rig,
    arp_request,
    assert_full_offer,
    discover,
    udp_frame,
)

GUEST_IP = bytes([10, 0, 2, 15])
GATEWAY = bytes([10, 0, 2, 2])
OUTSIDE = bytes([198, 18, 0, 1])


def dhcp_message(kind: int, mac: bytes, *, requested: bytes | None = None,
                 server: bytes | None = None, ciaddr: bytes = ZERO, xid: int = 1) -> bytes:
    options = [(dhcp.OPT_MESSAGE_TYPE, bytes((kind,)))]
    if requested is not None:
        options.append((dhcp.OPT_REQUESTED_IP, requested))
    if server is not None:
        options.append((dhcp.OPT_SERVER_ID, server))
    payload = dhcp.build(dhcp.BOOTREQUEST, xid, mac, options, ciaddr=ciaddr)
    if ciaddr != ZERO:
        return udp_frame(mac, ciaddr, GATEWAY, 68, 67, payload, dst_mac=b"\x52\x55" + GATEWAY)
    return udp_frame(mac, ZERO, LIMITED_BROADCAST, 68, 67, payload)


def storm_mac(i: int) -> bytes:
    return b"\x02\x77" + i.to_bytes(4, "big")


def lease_first_guest(rig: Rig) -> None:
    [offer] = rig.offers(discover())
    assert offer.yiaddr == GUEST_IP
    [ack] = rig.offers(dhcp_message(dhcp.REQUEST, MAC, requested=GUEST_IP, server=GATEWAY))
    assert ack.msg_type == dhcp.ACK


def renew_first_guest(rig: Rig) -> dhcp.DhcpMessage:
    [ack] = rig.offers(dhcp_message(dhcp.REQUEST, MAC, ciaddr=GUEST_IP, xid=9))
    return ack


# ---- DHCP ---------------------------------------------------------------------------


def test_dhcp_storm_from_many_macs_leaves_the_first_guests_lease_alone() -> None:
    rig = Rig()
    lease_first_guest(rig)
    server = rig.stack.dhcp
    for i in range(2000):
        mac = storm_mac(i)
        for offer in rig.offers(discover(mac, xid=i)):
            # Half of them go on to bind what they were offered.
            if i % 2:
                rig.offers(dhcp_message(dhcp.REQUEST, mac, requested=offer.yiaddr,
                                        server=GATEWAY))
        # And each tries to take the first guest's address.
        [nak] = rig.offers(dhcp_message(dhcp.REQUEST, mac, requested=GUEST_IP))
        assert nak.msg_type == dhcp.NAK
        assert rig.offers(dhcp_message(dhcp.DECLINE, mac, requested=GUEST_IP,
                                       server=GATEWAY)) == []
        rig.offers(dhcp_message(dhcp.RELEASE, mac, ciaddr=GUEST_IP))
    counters = rig.stack.counters
    assert len(server.leases()) <= len(server.pool)
    assert counters["dhcp.pool_exhausted"] >= 2000 - len(server.pool)
    assert counters["dhcp.drop.decline_not_holder"] == 2000
    assert "dhcp.decline" not in counters
    # The first guest renews, and restarts, with its address.
    rig.now += OFFER_HOLD + 1
    ack = renew_first_guest(rig)
    assert ack.msg_type == dhcp.ACK and ack.yiaddr == GUEST_IP
    [offer] = rig.offers(discover(xid=10))
    assert_full_offer(offer, rig.config)
    assert offer.yiaddr == GUEST_IP


def test_unbound_offers_of_a_discover_storm_expire_and_a_new_guest_is_served() -> None:
    rig = Rig()
    for i in range(500):
        rig.offers(discover(storm_mac(i), xid=i))
    newcomer = storm_mac(10_000)
    assert rig.offers(discover(newcomer)) == []  # everything is on offer to the storm
    rig.now += OFFER_HOLD + 1
    [offer] = rig.offers(discover(newcomer))
    assert_full_offer(offer, rig.config)
    assert len(rig.stack.dhcp.leases()) <= len(rig.stack.dhcp.pool)


# ---- ARP ----------------------------------------------------------------------------


def test_arp_storm_for_random_addresses_is_not_answered_and_keeps_no_state() -> None:
    rig = Rig()
    rng = random.Random(7)
    for _ in range(10_000):
        target = bytes([10, 0, 2, rng.randrange(4, 255)])
        if rng.random() < 0.5:
            target = rng.randbytes(4)
        if target in (GATEWAY, rig.config.dns):
            continue
        assert rig.send(arp_request(target=target)) == []
    assert len(rig.stack.timers) == 0
    assert rig.stack.counters == {}
    assert len(rig.send(arp_request())) == 1  # the gateway is still answered


# ---- UDP ----------------------------------------------------------------------------


def test_udp_flood_of_new_flows_is_bounded_and_counted_and_old_flows_work() -> None:
    rig = Rig()
    udp = rig.stack.udp
    udp.max_flows = 2000  # reached after the burst and a second of the rate limit
    host = rig.stack.host
    rig.send(udp_frame(MAC, GUEST_IP, OUTSIDE, 5000, 9, b"hello", dst_mac=b"\x52\x55" + GATEWAY))
    before = udp.flows[(GUEST_IP, 5000)]
    udp.host_datagram(before, "198.18.0.1", 9, b"hi", rig.now)  # the host answered it
    n = 20_000
    for i in range(n):
        rig.now += 0.0001  # 10,000 new flows a second: ten times the rate limit
        sport = 10_000 + i % 50_000
        rig.send(udp_frame(MAC, GUEST_IP, OUTSIDE, sport, 9, b"x",
                           dst_mac=b"\x52\x55" + GATEWAY))
    counters = rig.stack.counters
    assert len(udp.flows) <= udp.max_flows
    # Past the table's size each admitted flow took the place of an unanswered one.
    assert counters["drop.udp.flow_rate"] > 0 and counters["udp.flows_evicted"] > 0
    assert counters["udp.flows_opened"] + counters["drop.udp.flow_rate"] == n + 1
    assert counters["udp.flows_opened"] - counters["udp.flows_evicted"] == len(udp.flows)
    # The guest's answered flow from before the flood still carries its datagrams.
    assert udp.flows[(GUEST_IP, 5000)] is before
    rig.send(udp_frame(MAC, GUEST_IP, OUTSIDE, 5000, 9, b"still here",
                       dst_mac=b"\x52\x55" + GATEWAY))
    assert host.calls[-1][0] == "udp_send" and host.calls[-1][3] == b"still here"
    # A new flow right after the flood opens (the rate limit has refilled a token).
    rig.now += 0.01
    rig.send(udp_frame(MAC, GUEST_IP, OUTSIDE, 4999, 9, b"new",
                       dst_mac=b"\x52\x55" + GATEWAY))
    assert host.calls[-1][0] == "udp_send" and host.calls[-1][3] == b"new"
    # And the rest of the stack answers as before.
    [offer] = rig.offers(discover())
    assert_full_offer(offer, rig.config)
