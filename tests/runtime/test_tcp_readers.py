"""Host TCP sockets are read through one epoll set of the runtime's own (TcpReaders).

The loop's add_reader/remove_reader cost seven epoll_ctl, an ioctl and a poll handle
per connection under uvloop (issue 14); the set costs one epoll_ctl to add a socket
and one to forget it. These tests run the real Attachment on a socketpair (the test
plays the guest with scapy) against servers on loopback: no connection registers
anything with the loop, and data waiting on several host sockets at once all
reaches the guest in the loop iteration that sees it.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.runtime.linkrig import GUEST, GUEST_MAC, LinkRig

GATEWAY = "10.0.2.2"
GUEST_ISN = 1000


def _frame(rig: LinkRig, sport: int, dport: int, flags: str, seq: int, ack: int = 0) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=rig.our_mac) / IP(src=GUEST, dst=GATEWAY)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=65535,
                       options=[("MSS", 1460)] if flags == "S" else []))


def _segments(rig: LinkRig) -> list[Any]:
    return [f[TCP] for f in rig.frames() if TCP in f]


def _open(rig: LinkRig, server: socket.socket, sport: int) -> tuple[socket.socket, int]:
    """A guest connection from ``sport``, established; the host's end and our next seq."""
    port = server.getsockname()[1]
    rig.guest.send(_frame(rig, sport, port, "S", GUEST_ISN))
    rig.spin()
    (synack,) = [s for s in _segments(rig) if s.dport == sport]
    rig.guest.send(_frame(rig, sport, port, "A", GUEST_ISN + 1, synack.seq + 1))
    rig.spin()
    conn, _ = server.accept()
    return conn, synack.seq + 1


def _one_iteration(rig: LinkRig) -> None:
    rig.loop.call_soon(rig.loop.stop)
    rig.loop.run_forever()


def test_a_whole_connection_registers_nothing_with_the_loop(
        rig: LinkRig, server: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.spin()   # the attachment's own readers are in place
    registrations: list[str] = []
    for name in ("add_reader", "remove_reader", "add_writer", "remove_writer"):
        real = getattr(rig.loop, name)

        def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            registrations.append(_name)
            return _real(*args)

        monkeypatch.setattr(rig.loop, name, counted)
    _open(rig, server, 41000)   # the first connection makes the epoll set: one reader
    registrations.clear()
    conn, our_seq = _open(rig, server, 41001)
    port = server.getsockname()[1]
    conn.sendall(b"answer")
    conn.close()
    rig.spin()
    data = b"".join(bytes(s.payload) for s in _segments(rig) if s.dport == 41001)
    assert data == b"answer"
    rig.guest.send(_frame(rig, 41001, port, "FA", GUEST_ISN + 1, our_seq + len(data) + 1))
    rig.spin()
    flow = rig.att.stack.tcp.flows[(bytes([10, 0, 2, 100]), 41001, bytes([10, 0, 2, 2]), port)]
    assert flow.state == "TIME_WAIT" and flow.host_handle.sock is None, "host socket closed"
    assert registrations == []


def test_data_on_several_host_sockets_reaches_the_guest_in_one_iteration(
        rig: LinkRig, server: socket.socket) -> None:
    conns = [_open(rig, server, 42000 + i)[0] for i in range(5)]
    try:
        for i, conn in enumerate(conns):
            conn.sendall(b"%d" % i)
        _one_iteration(rig)
        got = {s.dport: bytes(s.payload) for s in _segments(rig) if bytes(s.payload)}
        assert got == {42000 + i: b"%d" % i for i in range(5)}
    finally:
        for conn in conns:
            conn.close()
