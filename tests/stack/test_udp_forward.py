"""UdpEngine.add_forward/remove_forward: a host UDP port forwarded into the guest.

Uses tests/stack/test_udp.py's harness (fake host, captured link, fake clock).
"""

from __future__ import annotations

import pytest

from tests.stack.test_udp import GATEWAY, GUEST, REMOTE, UdpHarness, addr, udp_of

SOCK = object()  # stands for the runtime's bound forwarding socket


def forwarded(h: UdpHarness, port: int = 53) -> object:
    return h.udp.add_forward(addr(GUEST), port, SOCK, h.now)


def test_peer_datagram_reaches_the_guest_and_the_reply_goes_back_to_that_peer() -> None:
    h = UdpHarness()
    flow = forwarded(h)
    h.udp.host_datagram(flow, REMOTE, 40000, b"query", h.now)
    h.udp.host_datagram(flow, "127.0.0.1", 40001, b"local", h.now)
    assert [udp_of(p) for p in h.take()] == [
        (REMOTE, 40000, GUEST, 53, b"query"),
        (GATEWAY, 40001, GUEST, 53, b"local"),
    ]
    h.send(REMOTE, 40000, b"answer", sport=53)
    h.send(GATEWAY, 40001, b"answer2", sport=53)
    assert h.host.calls == [("udp_send", flow, (REMOTE, 40000), b"answer"),
                            ("udp_send", flow, ("127.0.0.1", 40001), b"answer2")]


def test_reply_reaches_a_loopback_peer_other_than_127_0_0_1() -> None:
    h = UdpHarness()
    flow = forwarded(h)
    h.udp.host_datagram(flow, "127.0.0.5", 40000, b"q", h.now)
    h.take()
    h.send(GATEWAY, 40000, b"a", sport=53)
    assert h.host.calls == [("udp_send", flow, ("127.0.0.5", 40000), b"a")]


def test_loopback_peers_get_in_even_with_host_loopback_disabled() -> None:
    h = UdpHarness(disable_host_loopback=True)
    flow = forwarded(h)
    h.udp.host_datagram(flow, "127.0.0.1", 40000, b"q", h.now)
    assert [udp_of(p) for p in h.take()] == [(GATEWAY, 40000, GUEST, 53, b"q")]
    h.send(GATEWAY, 40000, b"a", sport=53)
    assert h.host.calls == [("udp_send", flow, ("127.0.0.1", 40000), b"a")]
    # ... but the guest still cannot start talking to the host's loopback itself.
    h.send(GATEWAY, 40002, b"x", sport=53)
    assert len(h.host.calls) == 1
    assert h.counters["drop.udp.policy"] == 1


def test_a_forward_never_expires_and_opens_no_socket_of_its_own() -> None:
    h = UdpHarness()
    flow = forwarded(h)
    h.advance(100000)
    assert h.udp.flows[(addr(GUEST), 53)] is flow
    assert h.host.calls == []
    h.udp.host_datagram(flow, REMOTE, 1, b"still", h.now)
    assert len(h.take()) == 1


def test_an_ordinary_flow_of_the_port_is_replaced_and_remove_releases_the_socket() -> None:
    h = UdpHarness()
    h.send(REMOTE, 7, sport=53)
    old = h.flow(53)
    flow = forwarded(h)
    assert ("udp_close", old) in h.host.calls and old.closed
    assert h.flow(53) is flow
    h.udp.remove_forward(flow)
    assert h.host.calls[-1] == ("udp_close", flow)
    assert (addr(GUEST), 53) not in h.udp.flows
    h.udp.remove_forward(flow)  # twice is harmless
    assert h.host.calls[-1] == ("udp_close", flow)
    assert h.host.names().count("udp_close") == 2
    # The guest port is an ordinary one again.
    h.send(REMOTE, 7, sport=53)
    assert h.host.calls[-2][0] == "udp_open"


def test_forwarding_the_same_guest_port_twice_is_an_error() -> None:
    h = UdpHarness()
    forwarded(h)
    with pytest.raises(ValueError):
        forwarded(h)


def test_close_all_releases_forwards_too() -> None:
    h = UdpHarness()
    flow = forwarded(h)
    h.udp.close_all()
    assert ("udp_close", flow) in h.host.calls


def test_a_peer_with_an_address_on_the_virtual_network_appears_as_the_gateway() -> None:
    h = UdpHarness()
    flow = forwarded(h)
    h.udp.host_datagram(flow, "10.0.2.100", 40000, b"nested", h.now)  # the guest's own address
    assert [udp_of(p) for p in h.take()] == [(GATEWAY, 40000, GUEST, 53, b"nested")]
    h.send(GATEWAY, 40000, b"back", sport=53)
    assert h.host.calls == [("udp_send", flow, ("10.0.2.100", 40000), b"back")]
