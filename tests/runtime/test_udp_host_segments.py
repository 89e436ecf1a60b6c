"""HostSockets.udp_send with ``segment``: datagrams laid end to end leave the host
socket as those datagrams (UDP_SEGMENT), and still do where the kernel refuses the
segmented send. Real UDP sockets on loopback."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pyslirp.runtime.hostsockets import HostSockets
from tests.runtime.linkrig import NoPacing


class _Counts:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class _Stack:
    def __init__(self) -> None:
        self.link = _Counts()


class _Flow:
    def __init__(self, sock: Any) -> None:
        self.host_handle = sock


class _NoGso:
    """A socket whose kernel refuses UDP_SEGMENT (as an old kernel or a small path MTU)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendmsg(self, *_args: Any) -> int:
        raise OSError(errno.EIO, "no UDP GSO here")

    def sendto(self, data: Any, dst: tuple[str, int]) -> int:
        return self.sock.sendto(data, dst)


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    yield sock
    sock.close()


def _received(peer: socket.socket, n: int) -> list[bytes]:
    return [peer.recv(65535) for _ in range(n)]


@pytest.mark.parametrize("wrap", [False, True], ids=["udp-segment", "fallback"])
def test_segments_leave_as_the_datagrams_they_were(peer: socket.socket, wrap: bool) -> None:
    loop = asyncio.new_event_loop()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        host = HostSockets(loop, NoPacing())
        host.stack = _Stack()  # type: ignore[assignment]
        datagrams = [bytes([i]) * 1400 for i in range(10)] + [b"tail"]
        flow = _Flow(_NoGso(sender) if wrap else sender)
        host.udp_send(flow, peer.getsockname(), [memoryview(b"".join(datagrams))], 1400)
        assert _received(peer, len(datagrams)) == datagrams
        assert host.stack.link.counters == {}
    finally:
        sender.close()
        loop.close()
