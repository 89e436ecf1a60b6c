"""A guest flooding ever new UDP ports from one socket, through a real Attachment: the
TAP device refuses the flood's frames before the stack parses them (UdpEngine.shed),
while the same socket's datagrams to its known peer all reach that peer."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from pyslirp.stack.config import NetConfig
from tests.runtime.linkrig import GUEST, GUEST_MAC, LinkRig

FLOOD = 3000


def _push(rig: LinkRig, frame: bytes) -> None:
    """Into the socketpair, letting the loop read whenever it is full."""
    while True:
        try:
            rig.guest.send(frame)
            return
        except BlockingIOError:
            rig.loop.run_until_complete(asyncio.sleep(0))


def test_flood_frames_are_refused_before_the_parse_and_the_known_peer_gets_all() -> None:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    port = peer.getsockname()[1]
    rig = LinkRig(NetConfig(vnet_hdr=False, offload=False, new_flow_rate=10.0,
                            new_flow_burst=10))
    try:
        rig.know_guest()
        parsed = 0
        receive = rig.att.receive

        def counting(frame: memoryview, now: float) -> None:
            nonlocal parsed
            parsed += 1
            receive(frame, now)

        rig.att.receive = counting

        def frame(dport: int, payload: bytes) -> bytes:
            return bytes(Ether(src=GUEST_MAC, dst=rig.our_mac) / IP(src=GUEST, dst="10.0.2.2")
                         / UDP(sport=41000, dport=dport) / payload)

        known = frame(port, b"known")
        _push(rig, known)
        rig.spin()
        flood = [frame(20000 + i, b"x" * 64) for i in range(FLOOD)]
        for i, f in enumerate(flood):
            _push(rig, f)
            if i % 100 == 0:
                _push(rig, known)
        rig.spin(0.1)
        got: list[Any] = []
        while True:
            try:
                got.append(peer.recv(100))
            except BlockingIOError:
                break
        assert got.count(b"known") == 1 + FLOOD // 100
        counters = rig.att.stack.link.counters
        assert counters["drop.udp.new_destination_rate"] >= FLOOD - 20
        assert parsed < FLOOD // 4, f"{parsed} of {FLOOD} flood frames were parsed"
    finally:
        rig.close()
        peer.close()
