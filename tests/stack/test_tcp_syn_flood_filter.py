"""The SYN-flood filter a TAP applies while the guest floods SYNs (TcpEngine.review_flood),
driven as the runtime drives it (Stack.review_floods every FLOOD_REVIEW_INTERVAL, the
device dropping what the filter names before the stack sees it: here a model of the
kernel's filter, whose program tests/runtime/test_tap_filter.py checks on a real TAP).

What must hold: the flood is filtered within a few reviews, with one engagement; the
stack reads a small share of it, yet admits as many new connections as without the
filter; SYNs to a known peer (a destination that accepted a connection) all arrive,
as without the filter; the filter comes off soon after the flood; and the SYNs never
read are counted, as an estimate close to the truth."""

from __future__ import annotations

import errno
import random
from typing import Any

from pyslirp.stack.admission import FLOOD_REVIEW_INTERVAL
from pyslirp.stack.tcp import SynFloodFilter
from pyslirp.wire import vnet
from tests.hotpath import SERVER_PORT, Rig
from tests.stack.floodfilter_checks import assert_filtered_as_admitted
from tests.stack.test_tcp_syn_shedding import frame

FLOOD_RATE = 50_000.0
FLOOD_SECONDS = 2.0


def _dropped_by(spec: SynFloodFilter, raw: bytes, rng: random.Random) -> bool:
    """What the TAP's filter does with ``raw`` (vnet header first): see SynFloodFilter."""
    f = raw[vnet.HEADER_LEN:]
    if (f[12:14] != b"\x08\x00" or f[14] != 0x45 or f[23] != 6
            or (f[20] << 8 | f[21]) & 0x3FFF or f[26:30] != spec.guest_ip
            or f[47] & 0x16 != 0x02 or f[30:34] not in spec.destinations):
        return False
    if (f[30:34], f[36] << 8 | f[37]) in spec.spared:
        return False
    return rng.random() >= spec.keep


def _run(filtering: bool) -> dict[str, Any]:
    rig = Rig()  # its download's server is a known peer
    rig.host.calls.clear()
    stack, tcp = rig.stack, rig.stack.tcp
    rng = random.Random(11)
    out: dict[str, Any] = {"flood_sent": 0, "flood_read_filtered": 0, "flood_dropped": 0,
                           "known_sent": 0, "engaged_at": None, "released_at": None}
    start = now = rig.now
    next_review: float | None = None
    connects_seen = 0
    i = 0
    while now < start + FLOOD_SECONDS + 1.0:
        now = start + i / FLOOD_RATE
        if next_review is not None and now >= next_review:
            if stack.review_floods(next_review):
                if tcp.syn_flood_filter is not None and out["engaged_at"] is None:
                    out["engaged_at"] = next_review - start
                if tcp.syn_flood_filter is None and now - start > FLOOD_SECONDS:
                    out["released_at"] = next_review - start - FLOOD_SECONDS
            on = tcp.syn_flood_filter is not None or tcp.syn_flood_watch.flood_rate
            next_review = next_review + FLOOD_REVIEW_INTERVAL if on else None
        flooding = now - start < FLOOD_SECONDS
        if i % 200 == 0:  # each from a port of its own: a new connection every time
            raw, kind = frame(sport=61000 + i // 200, dport=SERVER_PORT), "known"
        elif flooding:
            raw, kind = frame(sport=1024 + i % 59000, dport=10000 + i % 50000), "flood"
        else:
            i += 1
            continue
        i += 1
        out[f"{kind}_sent"] += 1
        spec = tcp.syn_flood_filter
        if filtering and spec is not None and _dropped_by(spec, raw, rng):
            assert kind == "flood", "the filter took a SYN to a known peer"
            out["flood_dropped"] += 1
            continue
        if kind == "flood" and spec is not None:
            out["flood_read_filtered"] += 1
        stack.receive_frame(memoryview(raw), now)
        if filtering and next_review is None and tcp.syn_shed_until > now:
            stack.review_floods(now)  # Attachment.watch_flood: the baseline
            next_review = now + FLOOD_REVIEW_INTERVAL
        # The host refuses each new connection at once (nobody listens there), so the
        # flood never fills the half-open table.
        for call in rig.host.calls[connects_seen:]:
            if call[0] == "tcp_connect" and call[1].remote_port != SERVER_PORT:
                call[1].host_connect_failed(errno.ECONNREFUSED, now)
        connects_seen = len(rig.host.calls)
        if i % 128 == 0:
            stack.flush(now)
    connects = [c[1].remote_port for c in rig.host.calls if c[0] == "tcp_connect"]
    out["admitted"] = sum(1 for port in connects if port != SERVER_PORT)
    out["known_connects"] = connects.count(SERVER_PORT)
    out["counters"] = dict(stack.link.counters)
    out["filter"] = tcp.syn_flood_filter
    return out


def test_a_syn_flood_is_filtered_yet_admitted_as_before_and_known_peers_pass() -> None:
    plain = _run(filtering=False)
    filtered = _run(filtering=True)
    assert_filtered_as_admitted(plain, filtered, "tcp.syn_flood_filter.engaged",
                                "tcp.drop.syn_flood_filtered")
    for run in (plain, filtered):
        assert run["known_connects"] == run["known_sent"], run
