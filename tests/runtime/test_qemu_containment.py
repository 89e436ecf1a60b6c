"""A frame the stack fails on (a bug) costs that frame only: the QEMU stream keeps its
framing and its connection, and the frames after it are served."""

from __future__ import annotations

from typing import Any

import pytest

from tests.runtime.test_qemu import (
    LoopThread,
    StreamReader,
    arp_request,
    connect,
    framed,
    is_arp_reply,
    stream_link,  # noqa: F401 - the fixture
)

POISON_TARGET = bytes([10, 0, 2, 99])


def poison_arp(server: LoopThread) -> None:
    """Make the stack raise on ARP requests for 10.0.2.99, as a bug in an engine would."""
    stack = server.attachment.stack
    original = stack._receive_arp

    def receive_arp(packet: Any) -> None:
        if packet.target_ip == POISON_TARGET:
            raise RuntimeError("injected fault")
        original(packet)

    server.call(lambda: setattr(stack, "_receive_arp", receive_arp))


def test_frame_that_makes_the_stack_raise_keeps_the_connection(
        stream_link: tuple[LoopThread, str],  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    server, path = stream_link
    poison_arp(server)
    with connect(path) as qemu:
        reader = StreamReader(qemu)
        last = framed(arp_request("10.0.2.17"))
        # The bad frame, then a good one, then the start of another: the read that gets
        # them must still keep the partial frame for the next read.
        qemu.sendall(framed(arp_request(target="10.0.2.99")) + framed(arp_request("10.0.2.16"))
                     + last[:10])
        assert is_arp_reply(reader.frame(), to_ip="10.0.2.16")
        qemu.sendall(last[10:])
        assert is_arp_reply(reader.frame(), to_ip="10.0.2.17")
        qemu.sendall(framed(arp_request(target="10.0.2.99")) + framed(arp_request("10.0.2.18")))
        assert is_arp_reply(reader.frame(), to_ip="10.0.2.18")
    counters = server.counters()
    assert counters["stack.error.RuntimeError"] == 2
    assert "drop.rx.bad_length" not in counters
    assert server.call(lambda: server.attachment.device.connections) == 1
    assert "out of sync" not in caplog.text
    assert "injected fault" in caplog.text
