"""The flood filter a TAP applies while a UDP flow floods (UdpEngine.review_flood), driven
as the runtime drives it: reviewed every FLOOD_REVIEW_INTERVAL, the device dropping what
the filter names before the stack sees it (here a model of the kernel's filter, whose
program tests/runtime/test_tap_filter.py checks on a real TAP).

What must hold: a flood is filtered within a few reviews and stays filtered with one
engagement; the stack then reads a small share of it, yet the flow is admitted as many
new destinations as without the filter; the guest's other flows and its DNS are never
touched; the filter comes off soon after the flood ends; and the frames never read are
counted, as an estimate close to the truth."""

from __future__ import annotations

import random
from typing import Any

from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP

from pyslirp.stack.admission import FLOOD_REVIEW_INTERVAL
from pyslirp.stack.udp import FloodFilter
from pyslirp.wire import ethernet
from tests.stack.fakes import StackHarness
from tests.stack.floodfilter_checks import assert_filtered_as_admitted

GUEST = "10.0.2.100"
GATEWAY = "10.0.2.2"
FLOOD_PORT = 41000
FLOOD_RATE = 50_000.0   # frames a second
FLOOD_SECONDS = 2.0
RATE, BURST = 2000.0, 500


def _dropped_by(spec: FloodFilter, frame: bytes, rng: random.Random) -> bool:
    """What the TAP's filter does with ``frame`` (plain Ethernet): see FloodFilter."""
    if (frame[12:14] != b"\x08\x00" or frame[14] != 0x45 or frame[23] != 17
            or (frame[20] << 8 | frame[21]) & 0x3FFF):
        return False
    if frame[26:30] + frame[34:36] not in spec.flows:
        return False
    dst = frame[30:34]
    if dst in spec.spared or dst[0] >= 224 or frame[36:38] == b"\x00\x43":
        return False
    return rng.random() >= spec.keep


def _run(filtering: bool) -> dict[str, Any]:
    h = StackHarness(new_flow_rate=RATE, new_flow_burst=BURST,
                     dns_upstreams=[("127.0.0.1", 53)])
    udp = h.stack.udp
    rng = random.Random(7)

    def frame(pkt: Any) -> bytes:
        return h.frame(ethernet.ETHERTYPE_IPV4, bytes(pkt))

    other = frame(IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT + 1, dport=7001) / b"other")
    # Each query its own ID (patched in place: no UDP checksum), or it is a retry.
    dns = bytearray(frame(IP(src=GUEST, dst="10.0.2.3") / UDP(sport=FLOOD_PORT, dport=53,
                                                              chksum=0)
                          / DNS(id=1, rd=1, qd=DNSQR(qname="example.test"))))
    flood = bytearray(frame(IP(src=GUEST, dst=GATEWAY) / UDP(sport=FLOOD_PORT, chksum=0)
                            / (b"x" * 64)))
    dport_at = len(flood) - 64 - 6
    out: dict[str, Any] = {"flood_sent": 0, "flood_read": 0, "flood_read_filtered": 0,
                           "flood_dropped": 0, "others": 0, "dns": 0, "engaged_at": None,
                           "released_at": None}
    start = h.now
    next_review: float | None = None
    end = start + FLOOD_SECONDS + 1.0
    i = 0
    while True:
        now = start + i / FLOOD_RATE
        if now >= end:
            break
        if next_review is not None and now >= next_review:
            # The runtime's review (Attachment._review_flood), on the same clock.
            if udp.review_flood(next_review):
                if udp.flood_filter is not None and out["engaged_at"] is None:
                    out["engaged_at"] = next_review - start
                if udp.flood_filter is None and now - start > FLOOD_SECONDS:
                    out["released_at"] = next_review - start - FLOOD_SECONDS
            keep_on = udp.flood_filter is not None or udp.flood_watch.flood_rate
            next_review = next_review + FLOOD_REVIEW_INTERVAL if keep_on else None
        flooding = now - start < FLOOD_SECONDS
        if i % 100 == 0:
            f, kind = other, "others"
        elif i % 150 == 1:
            dns[42:44] = (i & 0xFFFF).to_bytes(2, "big")
            f, kind = bytes(dns), "dns"
        elif flooding:
            flood[dport_at:dport_at + 2] = (1024 + i % 60000).to_bytes(2, "big")
            f, kind = bytes(flood), "flood"
        else:
            i += 1
            continue
        i += 1
        spec = udp.flood_filter
        if kind == "flood":
            out["flood_sent"] += 1
        elif kind != "flood":
            out[kind] += 1
        if filtering and spec is not None and _dropped_by(spec, f, rng):
            assert kind == "flood", f"the filter took a frame of {kind}"
            out["flood_dropped"] += 1
            continue
        h.now = now
        if kind == "flood":
            out["flood_read"] += 1
            if spec is not None:
                out["flood_read_filtered"] += 1
        if not (udp.shedding and udp.shed(f, now)):
            h.stack.receive_frame(memoryview(f), now)
        if udp.shedding and next_review is None and filtering:
            udp.review_flood(now)  # Attachment.watch_flood: the baseline
            next_review = now + FLOOD_REVIEW_INTERVAL
        if i % 128 == 0:
            h.stack.flush(now)
    h.stack.flush(h.now)
    sent = [c for c in h.host.calls if c[0] == "udp_send"]
    out["admitted"] = sum(1 for c in sent if c[1].guest_port == FLOOD_PORT)
    out["others_sent"] = sum(1 for c in sent if c[3] == b"other")
    out["dns_sent"] = sum(1 for c in h.host.calls if c[0] == "dns_send")
    out["counters"] = h.counters
    out["filter"] = udp.flood_filter
    return out


def test_a_flood_is_filtered_yet_admitted_as_before_and_nothing_else_is_touched() -> None:
    plain = _run(filtering=False)
    filtered = _run(filtering=True)
    assert_filtered_as_admitted(plain, filtered, "udp.flood_filter.engaged",
                                "drop.udp.flood_filtered")
    for run in (plain, filtered):
        assert run["others_sent"] == run["others"], run
    # (The fake upstream never answers: the forwarder stops at max_pending alike.)
    assert filtered["dns_sent"] == plain["dns_sent"] > 0


def test_a_flow_under_the_engage_rate_is_never_filtered() -> None:
    """A flow sending to new destinations a little past admission (3x the rate) is
    shed from the frames read, as before: the filter is for floods."""
    global FLOOD_RATE
    saved = FLOOD_RATE
    FLOOD_RATE = 3 * RATE * 1.5  # frames of every kind; about 3x the rate are the flood's
    try:
        run = _run(filtering=True)
    finally:
        FLOOD_RATE = saved
    assert "udp.flood_filter.engaged" not in run["counters"], run["counters"]
    assert run["flood_dropped"] == 0
