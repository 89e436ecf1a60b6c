"""How the TAP device reads: no wasted read in an exchange, whole batches in bulk.

A request/response guest sends one short frame and waits for the answer; reading
the TAP again to learn that nothing follows costs a syscall and a raised
BlockingIOError per exchange (issue 14). These tests count the reads of the real
Attachment's TAP device (a socketpair: one frame per read, as a TAP) while the test
plays the guest with scapy, which is deterministic where timing is not.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.runtime.linkrig import LinkRig, guest_tcp_frame, one_iteration, tcp_segments

GUEST_ISN = 5000


class TapReads:
    """Counts the reads of one fd, and those that found nothing (EAGAIN)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0
        self.empty = 0

    def reset(self) -> None:
        self.reads = self.empty = 0


@pytest.fixture
def tap_reads(rig: LinkRig, monkeypatch: pytest.MonkeyPatch) -> Iterator[TapReads]:
    counter = TapReads(rig.tap.fileno())
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        if fd != counter.fd:
            return real_read(fd, n)
        counter.reads += 1
        try:
            return real_read(fd, n)
        except BlockingIOError:
            counter.empty += 1
            raise

    monkeypatch.setattr(os, "read", counting_read)
    yield counter


class Exchange:
    """One guest connection to ``server``; ``seq`` / ``ack`` are the guest's next ones."""

    def __init__(self, rig: LinkRig, server: socket.socket) -> None:
        self.rig = rig
        self.port = server.getsockname()[1]
        rig.guest.send(guest_tcp_frame(rig, self.port, "S", GUEST_ISN))
        rig.spin()
        (synack,) = tcp_segments(rig)
        self.seq, self.ack = GUEST_ISN + 1, synack.seq + 1
        rig.guest.send(guest_tcp_frame(rig, self.port, "A", self.seq, self.ack))
        rig.spin()
        self.conn, _ = server.accept()
        self.conn.settimeout(2.0)
        # Else Nagle holds a write behind our socket's delayed ACK of the last one.
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes) -> None:
        self.rig.guest.send(guest_tcp_frame(self.rig, self.port, "PA", self.seq, self.ack, payload))
        self.seq += len(payload)

    def take_data(self) -> bytes:
        """What reached the guest since the last call; acknowledged with the next send."""
        data = b"".join(bytes(seg.payload) for seg in tcp_segments(self.rig))
        self.ack += len(data)
        return data

    def round_trip(self, request: bytes) -> bytes:
        self.send(request)
        self.rig.spin()
        assert self.conn.recv(100) == request
        self.conn.send(request.upper())
        self.rig.spin()
        return self.take_data()

    def lone_requests(self) -> None:
        """Two request/response exchanges, after which the TAP reader stops at lone frames."""
        for c in b"ab":
            assert self.round_trip(bytes([c])) == bytes([c]).upper()


def test_request_response_reads_the_tap_once_per_request(
        rig: LinkRig, server: socket.socket, tap_reads: TapReads) -> None:
    ex = Exchange(rig, server)
    with ex.conn:
        assert ex.round_trip(b"a") == b"A"  # the first may still read until EAGAIN
        tap_reads.reset()
        answers = [ex.round_trip(bytes([c])) for c in b"bcdefgh"]
    assert answers == [bytes([c]) for c in b"BCDEFGH"]
    assert (tap_reads.reads, tap_reads.empty) == (7, 0), \
        "one read per request, none that finds the TAP empty"


def test_frames_queued_behind_a_lone_one_are_all_served(
        rig: LinkRig, server: socket.socket, tap_reads: TapReads) -> None:
    # After lone requests, a guest sends three segments at once: a read that stopped
    # after the first leaves the others ready (the loop's readers are
    # level-triggered); all reach the host, in order, without a timer.
    ex = Exchange(rig, server)
    with ex.conn:
        ex.lone_requests()
        for c in b"xyz":
            ex.send(bytes([c]))
        rig.spin()
        got = b""
        while len(got) < 3:
            got += ex.conn.recv(100)
    assert got == b"xyz"


def test_a_burst_while_data_is_in_flight_to_the_guest_is_read_in_one_wake_up(
        rig: LinkRig, server: socket.socket, tap_reads: TapReads) -> None:
    # Bulk keeps its batches: while the guest has our data to acknowledge, its ACKs
    # come in runs, and one wake-up reads the run to the end (EAGAIN).
    ex = Exchange(rig, server)
    with ex.conn:
        ex.lone_requests()
        ex.conn.send(b"x" * 4000)  # three segments toward the guest, unacknowledged
        rig.spin()
        segs = [seg for seg in tcp_segments(rig) if bytes(seg.payload)]
        assert len(segs) == 3
        tap_reads.reset()
        for seg in segs:
            end = seg.seq + len(bytes(seg.payload))
            rig.guest.send(guest_tcp_frame(rig, ex.port, "A", ex.seq, end))
        one_iteration(rig.loop)
    assert (tap_reads.reads, tap_reads.empty) == (4, 1)
