"""Floods from the guest: pyslirp's memory stays bounded and it keeps serving.

A SYN flood to thousands of ports of the gateway (10.0.2.2, the host's
loopback, where nothing listens on them) and uploads stalled toward a host
peer that accepts but never reads; meanwhile a well-behaved download of the
session's payload still arrives intact. pyslirp runs with a small
``--max-buffered`` so the stalled uploads run into it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, StartSlirp, _read_line, sha256_of_get
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e

FLOOD_PORTS = 3000
STALLED = 12
#: The budget pyslirp gets: 12 stalled uploads would hold 48 MiB without it (4 MiB each).
MAX_BUFFERED_MIB = 8
#: Growth of pyslirp's resident memory the floods may cause: the budget plus the
#: allocator's and the flow table's share (thousands of short-lived flows; ~4 MiB
#: measured in all).
RSS_GROWTH_BOUND_MIB = MAX_BUFFERED_MIB + 12

#: Uploads opened one after another, each once the previous one stalled (a send
#: blocked for a second: its window is closed and pyslirp holds what it may); prints
#: "stalled" when all are, then keeps them open until killed.
STALL_ONE_AFTER_ANOTHER = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[3])):
    s = socket.socket()
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.settimeout(1)
    try:
        while True:
            s.send(bytes(65536))
    except socket.timeout:
        held.append(s)
print("stalled", flush=True)
while True:
    time.sleep(60)
"""

#: Accepts connections and never reads them (a host peer that stopped reading).
SINK = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
print(s.getsockname()[1], flush=True)
held = []
while True:
    held.append(s.accept()[0])
"""

#: Nonblocking connects to COUNT ports of the gateway, all at once; prints how many
#: were refused once every connect has finished (or 20 s passed).
SYN_FLOOD = """
import resource, selectors, socket, sys, time
gateway, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 256, count + 256))
sel = selectors.DefaultSelector()
socks = []
for port in range(first, first + count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((gateway, port))
    sel.register(s, selectors.EVENT_WRITE)
    socks.append(s)
pending, deadline = len(socks), time.monotonic() + 20
while pending and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=1):
        sel.unregister(key.fileobj)
        pending -= 1
print(sum(1 for s in socks if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))
"""

#: Uploads that block once the window closes; they are killed at the end.
STALL = """
import socket, sys
s = socket.socket()
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(bytes(64 << 20))
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _counters(log: str) -> dict[str, int]:
    match = re.search(r"counters for \S+: (.*)", log)
    assert match, log
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split(", "))}


def test_syn_flood_and_stalled_uploads_leave_memory_bounded_and_service_intact(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    slirp = start_slirp(f"--max-buffered={MAX_BUFFERED_MIB}M")
    sink = host.ns.popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    stalls: list[subprocess.Popen[bytes]] = []
    try:
        assert sink.stdout is not None
        sink_port = sink.stdout.readline().strip()
        # Warm up (imports, first flows), then take the baseline.
        assert sha256_of_get(guest, host.url("/payload")) == host.sha256
        before = _rss_kib(slirp.pid)

        refused = guest.python(SYN_FLOOD, GATEWAY, "20000", str(FLOOD_PORTS),
                               timeout=60).stdout
        assert int(refused) >= FLOOD_PORTS * 9 // 10  # each closed port answered (RST)
        # A well-behaved transfer in the same guest, running while the stalled uploads
        # fill what pyslirp lets them hold, completes byte for byte. (A transfer that
        # starts only once they hold all they may: the test below.)
        with ThreadPoolExecutor(1) as pool:
            download = pool.submit(sha256_of_get, guest, host.url("/payload"))
            stalls = [guest.popen([sys.executable, "-c", STALL, GATEWAY, sink_port],
                                  stdin=subprocess.DEVNULL) for _ in range(STALLED)]
            grown: list[int] = []

            def settled() -> bool:
                grown.append(_rss_kib(slirp.pid))
                return len(grown) > 8 and grown[-1] <= grown[-8]

            wait_for(settled, timeout=60, interval=0.25, what="pyslirp's memory to settle")
            assert download.result() == host.sha256
        growth_mib = (_rss_kib(slirp.pid) - before) / 1024
        print(f"pyslirp RSS {before / 1024:.0f} MiB before the floods, grew by "
              f"{growth_mib:.1f} MiB (bound {RSS_GROWTH_BOUND_MIB} MiB)")
        assert growth_mib <= RSS_GROWTH_BOUND_MIB, f"pyslirp grew by {growth_mib:.0f} MiB"
        assert all(p.poll() is None for p in stalls), "a stalled upload was reset"
    finally:
        for p in stalls:
            p.kill()
            p.wait()
        sink.kill()
        sink.wait()
    assert slirp.stop() == -signal.SIGTERM
    counters = _counters(slirp.log_text())
    assert counters["tcp.flows_opened"] >= FLOOD_PORTS + STALLED
    assert counters["tcp.connect_refused"] >= FLOOD_PORTS * 9 // 10


def test_download_started_after_stalled_uploads_took_the_budget_completes(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    """Uploads toward a host peer that never reads open one after another, each
    growing while few flows share the budget, until together they hold all that
    pyslirp lets them; only then does a download start: it completes intact.

    (Before, the download got no room at all, its host socket was never read past
    the first bytes and curl timed out: stalled flows never free what they hold.)
    """
    slirp = start_slirp(f"--max-buffered={MAX_BUFFERED_MIB}M")
    sink = host.ns.popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
    stalls: subprocess.Popen[str] | None = None
    try:
        assert sink.stdout is not None
        sink_port = sink.stdout.readline().strip()
        stalls = guest.popen([sys.executable, "-c", STALL_ONE_AFTER_ANOTHER, GATEWAY,
                              sink_port, str(STALLED)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert stalls.stdout is not None
        assert _read_line(stalls.stdout, 120, "the stalled uploads").strip() == "stalled"
        started = time.monotonic()
        assert sha256_of_get(guest, host.url("/payload"), timeout=120) == host.sha256
        print(f"download after {STALLED} stalled uploads: {host.size / 2**20:.0f} MiB in "
              f"{time.monotonic() - started:.1f} s")
        assert stalls.poll() is None, "the stalled uploads were reset"
    finally:
        if stalls is not None:
            stalls.kill()
            stalls.wait()
        sink.kill()
        sink.wait()
    slirp.stop()
