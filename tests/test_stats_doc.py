"""docs/stats.md lists every counter the code increments, and the flow gauges it reports.

Counter names are an interface (``get_stats``, ``pyslirp stats``, scripts that
read them): a new counter without documentation fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from pyslirp import stats

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "stats.md").read_text()
#: A line that increments a counter: link.count(...), counters[...] +=, frag's _abandon(...).
_INCREMENT = re.compile(r"\bcount\(|_counters\[|_abandon\(")
_NAME = re.compile(r'"((?:drop|tcp|udp|icmp|icmpv6|dns|dhcp|dhcpv6|ndp|hostfwd|host|stack)'
                   r'(?:\.[a-z0-9_]+)+)"')


def counted_names() -> set[str]:
    names = set()
    for path in (ROOT / "pyslirp").rglob("*.py"):
        for line in path.read_text().splitlines():
            if _INCREMENT.search(line):
                names.update(_NAME.findall(line))
    return names


def documented() -> set[str]:
    return set(re.findall(r"^\| `([a-z0-9_.A-Z]+)` \|", DOC, re.MULTILINE))


def test_the_scan_finds_counters() -> None:
    # Guards the scan itself: a refactor that hides every name from it must fail here.
    assert {"tcp.flows_opened", "dns.query", "drop.frag.overlap", "host.out_of_fds",
            "host.socket_failed", "hostfwd.tcp_opened"} <= counted_names()


def test_every_counter_is_documented() -> None:
    assert sorted(counted_names() - documented()) == []


def test_every_documented_counter_exists() -> None:
    patterns = {"drop.malformed.LAYER", "stack.error.EXCEPTION", "icmpv6.ignored.KIND",
                "dhcpv6.ignored.TYPE"}
    gauges = set(stats.FLOW_NAMES)
    assert sorted(documented() - counted_names() - patterns - gauges) == []


def test_every_flow_gauge_is_documented() -> None:
    assert set(stats.FLOW_NAMES) <= documented()
