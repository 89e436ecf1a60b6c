"""Busy polling (--busy-poll): the loop polls for a moment after work, then sleeps again."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
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
