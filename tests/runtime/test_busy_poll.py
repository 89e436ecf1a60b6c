"""Busy polling (--busy-poll): the loop polls for a moment after work, then sleeps again."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from pyslirp.runtime import attachment
from pyslirp.stack.config import NetConfig
from tests.runtime.linkrig import GUEST, GUEST_MAC, LinkRig


def _arp_for_gateway() -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst="10.0.2.2"))


def _rig(busy_poll: float) -> LinkRig:
    return LinkRig(dataclasses.replace(NetConfig(vnet_hdr=False, offload=False),
                                       busy_poll=busy_poll))


def test_polls_after_traffic_then_goes_back_to_sleep() -> None:
    rig = _rig(0.5)  # long, so that a slow CI machine still finds it polling
    try:
        rig.guest.send(_arp_for_gateway())
        rig.loop.run_until_complete(asyncio.sleep(0.005))
        assert [f[ARP].psrc for f in rig.frames()] == ["10.0.2.2"]  # answered, and...
        assert rig.att._polling  # ...still polling: a next frame would be seen at once
        rig.spin(0.8)
        assert not rig.att._polling  # an idle stack does not burn a CPU
    finally:
        rig.close()


def test_busy_poll_zero_never_polls() -> None:
    rig = _rig(0)
    try:
        rig.guest.send(_arp_for_gateway())
        rig.loop.run_until_complete(asyncio.sleep(0.005))
        assert [f[ARP].psrc for f in rig.frames()] == ["10.0.2.2"]
        assert not rig.att._polling
    finally:
        rig.close()


def test_the_poll_ends_after_busy_poll_of_its_own_clock_not_the_loops(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # uvloop's clock ticks in whole milliseconds: timed on it, a 50 us poll went on until
    # the next tick (~0.5 ms of a CPU after every exchange). A fake fine clock that moves
    # 10 us per read ends the poll after about five reads, whatever the loop's clock says.
    reads = [0]

    def fake_clock() -> float:
        reads[0] += 1
        return reads[0] * 10e-6

    monkeypatch.setattr(attachment, "poll_clock", fake_clock)
    rig = _rig(50e-6)
    try:
        rig.guest.send(_arp_for_gateway())
        rig.loop.run_until_complete(asyncio.sleep(0.005))
        assert [f[ARP].psrc for f in rig.frames()] == ["10.0.2.2"]
        assert not rig.att._polling
        assert reads[0] <= 10, f"the poll read its clock {reads[0]} times for 50 us"
    finally:
        rig.close()


def test_a_stream_of_host_datagrams_starts_no_poll_and_a_lone_reply_does() -> None:
    # Polling between the datagrams of a host stream only took CPU from both ends:
    # UDP download 6.4-7.1 -> 4.9-5.2 us of CPU per datagram at 300 Mbit/s.
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    rig = _rig(0.5)
    try:
        rig.know_guest()
        rig.send(IP(src=GUEST, dst="10.0.2.2") / UDP(sport=41000, dport=peer.getsockname()[1])
                 / b"request")
        _request, flow_addr = peer.recvfrom(100)
        rig.spin(0.8)
        assert not rig.att._polling
        for i in range(10):  # waiting together when the loop next looks: a stream
            peer.sendto(b"%d" % i, flow_addr)
        rig.spin(0.005)
        assert len([f for f in rig.frames() if UDP in f]) == 10
        assert not rig.att._polling, "a stream of host datagrams kept the loop polling"
        peer.sendto(b"reply", flow_addr)
        rig.spin(0.005)
        assert [bytes(f[UDP].payload) for f in rig.frames() if UDP in f] == [b"reply"]
        assert rig.att._polling  # a lone reply: the guest's answer may follow at once
    finally:
        rig.close()
        peer.close()
