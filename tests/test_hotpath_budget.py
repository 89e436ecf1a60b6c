"""Deterministic guard on the hot path: function calls per 64 KB frame.

Timings are noisy on shared 2-core machines, so the regular suite does not time
anything; it counts the calls (Python and C) the stack makes per 64 KB TSO
super-frame, guest->host and host->guest, and for the small transactions
bench/run.py times (a 1-byte round trip, a whole short connection, a UDP
datagram each way, a DNS query forwarded and answered), and fails when a
change raises a count above the budget checked in beside this file. Speed itself lives in bench/.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.hotpath import DNS_ANSWER_RR, DNS_QUESTION, SUPER_PAYLOAD, Rig

BUDGET = json.loads((Path(__file__).parent / "hotpath_budget.json").read_text())


def count_calls(fn: Callable[[], None]) -> int:
    calls = 0

    def profiler(_frame: object, event: str, _arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.fixture(params=["ipv4", "ipv6"])
def rig(request: pytest.FixtureRequest) -> Rig:
    rig = Rig(ipv6=request.param == "ipv6")
    # Warm up: the first frames take one-off paths (window growth, reader resume).
    for _ in range(3):
        rig.upload(rig.upload_frame())
        rig.download()
    return rig


def test_upload_frame_stays_within_call_budget(rig: Rig) -> None:
    frame = rig.upload_frame()
    before = rig.sink.frames
    calls = count_calls(lambda: rig.upload(frame))
    assert rig.flow.state == "ESTABLISHED"
    assert rig.sink.frames == before + 1, "one coalesced ACK per frame batch"
    budget = BUDGET["upload_64k_frame_ipv6" if rig.ipv6 else "upload_64k_frame"]
    assert calls <= budget, f"{calls} calls per 64 KB upload frame, budget {budget}"


def test_download_frame_stays_within_call_budget(rig: Rig) -> None:
    written_before = rig.sink.frames
    calls = count_calls(rig.host_data)
    assert rig.sink.frames == written_before + 1, "64 KB goes out as one GSO super-frame"
    parts = rig.sink.last
    assert sum(len(p) for p in parts[1:]) == SUPER_PAYLOAD, "payload passed through whole"
    ack = rig.ack_frame()
    calls += count_calls(lambda: rig.receive(ack))
    assert rig.sink.frames == written_before + 1, "a pure ACK from the guest is not answered"
    budget = BUDGET["download_64k_frame_ipv6" if rig.ipv6 else "download_64k_frame"]
    assert calls <= budget, f"{calls} calls per 64 KB download frame, budget {budget}"


def test_upload_payload_reaches_the_host_without_copies(rig: Rig) -> None:
    """The host write gets a view of the frame itself, not a copy of the payload."""
    seen: list[object] = []

    def spy(flow: object, data: memoryview) -> int:
        seen.append(data)
        return len(data)

    rig.host.tcp_write = spy  # type: ignore[method-assign]
    rig.upload(rig.upload_frame())
    assert len(seen) == 1
    assert isinstance(seen[0], memoryview), type(seen[0])
    assert len(seen[0]) == SUPER_PAYLOAD


# ---- small transactions: one round trip, one connection, one UDP datagram -------------

def _within(calls: int, key: str, what: str) -> None:
    assert calls <= BUDGET[key], f"{calls} calls per {what}, budget {BUDGET[key]}"


def test_one_byte_round_trip_stays_within_call_budget(rig: Rig) -> None:
    for _ in range(3):
        rig.round_trip(rig.ping_frame())
    ping = rig.ping_frame()
    before = rig.sink.frames
    calls = count_calls(lambda: rig.round_trip(ping))
    assert rig.flow.state == "ESTABLISHED"
    assert rig.sink.frames > before, "the host's echo reached the guest"
    assert sum(len(p) for p in rig.sink.last[1:]) == 1, "the last frame carries the 1-byte echo"
    _within(calls, "round_trip_1byte", "1-byte round trip")


def test_short_connection_stays_within_call_budget(rig: Rig) -> None:
    for port in range(42000, 42003):   # first connections take one-off paths
        rig.short_connection(port)
    flows_before = len(rig.stack.tcp)
    box: list[Any] = []
    calls = count_calls(lambda: box.append(rig.short_connection(42010)))
    flow = box[0]
    assert flow.state == "CLOSED", "the connection ran to its end"
    assert len(rig.stack.tcp) == flows_before, "and left no flow behind"
    _within(calls, "short_connection", "connection (SYN to last ACK)")


def test_udp_datagram_each_way_stays_within_call_budget(rig: Rig) -> None:
    flow = rig.udp_up(rig.udp_frame())   # opens the flow: not the steady state
    rig.udp_down(flow)
    frame = rig.udp_frame()
    sent = len([c for c in rig.host.calls if c[0] == "udp_send"])
    up = count_calls(lambda: rig.receive_udp(frame))
    assert len([c for c in rig.host.calls if c[0] == "udp_send"]) == sent + 1
    before = rig.sink.frames
    down = count_calls(lambda: rig.udp_down(flow))
    assert rig.sink.frames == before + 1, "the reply goes to the guest as one frame"
    _within(up, "udp_datagram_up", "UDP datagram guest -> host")
    _within(down, "udp_datagram_down", "UDP datagram host -> guest")


def test_dns_query_stays_within_call_budget(rig: Rig) -> None:
    for query_id in range(3):   # the first query makes the reply template
        rig.dns_answer(rig.dns_query(rig.dns_query_frame(query_id)))
    frame = rig.dns_query_frame(0x4242)
    before = rig.sink.frames
    box: list[bytes] = []
    calls = count_calls(lambda: box.append(rig.dns_query(frame)))
    sent = box[0]
    assert sent[2:] == frame[-len(sent) + 2:], "the query went upstream byte for byte"
    calls += count_calls(lambda: rig.dns_answer(sent))
    assert rig.sink.frames == before + 1, "the answer went to the guest as one frame"
    reply = b"".join(bytes(p) for p in rig.sink.last)
    assert reply[-len(DNS_ANSWER_RR) - len(DNS_QUESTION) - 12:][:2] == b"\x42\x42", \
        "under the guest's own ID"
    assert not rig.stack.dns.pending, "and the query is finished"
    _within(calls, "dns_query", "DNS query (in, upstream, answer out)")
