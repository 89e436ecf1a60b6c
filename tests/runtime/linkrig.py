"""A real Attachment on one end of a socketpair, the test as the guest on the other.

Frames cross as plain Ethernet (no vnet header), built and dissected with scapy, so
runtime tests see what the runtime really does with its host sockets, without a TAP.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from pyslirp.runtime.attachment import Attachment
from pyslirp.runtime.device import TapDevice
from pyslirp.stack.config import NetConfig

GUEST_MAC = "02:00:00:00:00:64"
GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
GUEST_PORT = 40000


def guest_tcp_frame(rig: LinkRig, port: int, flags: str, seq: int, ack: int = 0,
                    payload: bytes = b"") -> bytes:
    """A TCP segment from the guest's port GUEST_PORT to the gateway's ``port``."""
    return bytes(Ether(src=GUEST_MAC, dst=rig.our_mac)
                 / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=GUEST_PORT, dport=port, flags=flags, seq=seq, ack=ack,
                       window=65535, options=[("MSS", 1460)] if flags == "S" else [])
                 / payload)


def one_iteration(loop: asyncio.AbstractEventLoop) -> None:
    """Run exactly one loop iteration: ready I/O callbacks run, what they schedule does not."""
    loop.call_soon(loop.stop)
    loop.run_forever()


def tcp_segments(rig: LinkRig) -> list[Any]:
    """The TCP layers of the frames the guest has got since the last call."""
    return [f[TCP] for f in rig.frames() if TCP in f]


class NoPacing:
    """A HostSockets pacing that does nothing (no flushes, timer or polling)."""

    busy_poll = 0.0

    def schedule_flush(self) -> None: ...
    def schedule_quiet_flush(self) -> None: ...
    def flush_now(self, now: float) -> None: ...
    def arm_timer(self) -> None: ...
    def keep_polling(self, now: float) -> None: ...


class LinkRig:
    def __init__(self, config: NetConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.tap, self.guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.guest.setblocking(False)
        self.config = config
        self.att = Attachment(self.loop, TapDevice(self.tap.fileno()), config)
        self.our_mac = ":".join(f"{b:02x}" for b in config.our_mac)

    def know_guest(self) -> None:
        """Let the stack know the guest's MAC without an ARP exchange."""
        self.att.stack.link.guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))

    def spin(self, seconds: float = 0.02) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def send(self, pkt: Packet) -> None:
        """One frame from the guest (``pkt`` is what goes inside the Ethernet header)."""
        self.guest.send(bytes(Ether(src=GUEST_MAC, dst=self.our_mac) / pkt))
        self.spin()

    def frames(self) -> list[Packet]:
        """Every frame the stack has sent the guest since the last call."""
        out: list[Packet] = []
        while True:
            try:
                out.append(Ether(self.guest.recv(70000)))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.att.close()
        self.spin(0)
        self.loop.close()
        self.tap.close()
        self.guest.close()
