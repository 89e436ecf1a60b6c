"""Where the runtime sits on a TCP exchange's critical path: no loop round trips.

A guest's connect() waits for our SYN-ACK, and a request/response client waits for
the host's answer; each loop iteration between the event and the frame is time the
guest waits (bench/README.md, "Latency"). These tests run the real Attachment on a
socketpair (the test plays the guest with scapy) against servers on loopback, and
count loop iterations, which is deterministic where timing is not. They also check
that the retransmission timer, which the runtime re-arms lazily, still fires.
"""

from __future__ import annotations

import socket

from tests.runtime.linkrig import LinkRig, guest_tcp_frame, one_iteration, tcp_segments

GUEST_ISN = 1000


def _connect(rig: LinkRig, server: socket.socket) -> tuple[socket.socket, int]:
    """Complete a guest connection to the server; return the host side and our ISS."""
    port = server.getsockname()[1]
    rig.guest.send(guest_tcp_frame(rig, port, "S", GUEST_ISN))
    rig.spin()
    (synack,) = tcp_segments(rig)
    rig.guest.send(guest_tcp_frame(rig, port, "A", GUEST_ISN + 1, synack.seq + 1))
    rig.spin()
    conn, _ = server.accept()
    return conn, synack.seq + 1


def test_syn_is_answered_in_the_iteration_that_reads_it(rig: LinkRig,
                                                          server: socket.socket) -> None:
    # A loopback connect completes inside connect(); the SYN-ACK must not wait for
    # another loop iteration (behind other flows' work) before going to the guest.
    rig.guest.send(guest_tcp_frame(rig, server.getsockname()[1], "S", GUEST_ISN))
    one_iteration(rig.loop)
    (synack,) = tcp_segments(rig)
    assert synack.flags == "SA" and synack.ack == GUEST_ISN + 1


def test_host_data_reaches_the_guest_in_the_iteration_that_reads_it(
        rig: LinkRig, server: socket.socket) -> None:
    conn, _ = _connect(rig, server)
    with conn:
        conn.send(b"pong")  # loopback: readable at once on the runtime's socket
        one_iteration(rig.loop)
        data = [bytes(seg.payload) for seg in tcp_segments(rig) if bytes(seg.payload)]
        assert data == [b"pong"]


def test_guest_fin_after_the_host_closed_gets_one_fin_ack(rig: LinkRig,
                                                          server: socket.socket) -> None:
    # Request/response peers close right after the response: when the guest's FIN
    # arrives the host's EOF is usually waiting unread. The guest's FIN is then
    # answered by our FIN carrying its ACK (one frame), not an ACK and a FIN.
    conn, rcv_nxt = _connect(rig, server)
    port = server.getsockname()[1]
    rig.guest.send(guest_tcp_frame(rig, port, "FA", GUEST_ISN + 1, rcv_nxt))
    conn.close()  # after the guest's FIN, so the TAP is the first ready fd
    one_iteration(rig.loop)
    frames = [(str(seg.flags), seg.ack) for seg in tcp_segments(rig)]
    assert frames == [("FA", GUEST_ISN + 2)]
