"""A UDP flow's host socket holds a burst the stack has not read yet: datagrams the
host sends while pyslirp waits for a CPU reach the guest instead of the kernel's
drop counter (``RcvbufErrors``). Real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from pyslirp.runtime.hostsockets import HostSockets
from tests.runtime.linkrig import NoPacing

#: More 1400-byte datagrams than a socket's default queue holds (212992 bytes: 92
#: on loopback), fewer than one asking for 1 MiB gets even where net.core.rmem_max
#: is the common 212992 (twice that: 184).
BURST = 150


class _Udp:
    """The UDP engine's side of a host read: what reaches the guest."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    def host_datagram(self, _flow: Any, _ip: str, _port: int, data: bytes,
                      _now: float) -> None:
        self.delivered.append(bytes(data))

    def host_datagrams(self, _flow: Any, _ip: str, _port: int, run: list[bytes],
                       _now: float) -> None:
        self.delivered += [bytes(d) for d in run]


class _Stack:
    def __init__(self) -> None:
        self.udp = _Udp()


class _Flow:
    v6 = False
    host_handle: socket.socket | None = None


def test_a_burst_the_host_sends_while_the_stack_is_busy_reaches_the_guest_whole() -> None:
    loop = asyncio.new_event_loop()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host = HostSockets(loop, NoPacing())
    stack = _Stack()
    host.stack = stack  # type: ignore[assignment]
    flow = _Flow()
    try:
        assert host.udp_open(flow)
        sock = flow.host_handle
        assert sock is not None
        # The guest's datagram goes out first (and gives the socket its port); the
        # host's answer is the burst.
        sender.bind(("127.0.0.1", 0))
        sender.settimeout(5)
        host.udp_send(flow, sender.getsockname(), b"request")
        _request, target = sender.recvfrom(100)
        sent = [i.to_bytes(2, "big") * 700 for i in range(BURST)]
        for data in sent:   # the loop does not run meanwhile: the stack is busy
            sender.sendto(data, target)
        for _ in range(BURST):  # each callback reads a batch; stop once one reads nothing
            before = len(stack.udp.delivered)
            host._udp_readable(flow, sock, [-1.0])
            if len(stack.udp.delivered) == before:
                break
        assert len(stack.udp.delivered) == BURST, (
            f"{BURST - len(stack.udp.delivered)} of {BURST} datagrams lost in the host "
            "socket's queue")
        assert sorted(stack.udp.delivered) == sorted(sent)
    finally:
        host.udp_close(flow)
        sender.close()
        loop.close()
