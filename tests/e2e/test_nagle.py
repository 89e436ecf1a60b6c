"""A guest client using Nagle's algorithm against pyslirp's delayed ACKs (tcp.py's module
docstring, "Delayed ACKs").

The client writes two small messages back to back (TCP_NODELAY off, the default) and then
waits for the answer; the host server answers only once it has both. Nagle holds the second
message until the first is acknowledged, and the host cannot reply before it has the second,
so an exchange whose first message has its ACK delayed rests on that ACK going out alone at
its deadline, which the stack's counter ``tcp.delayed_ack`` counts; after that first miss the
flow delays no more, so it happens once per connection. Were the ACK held for a reply that
never comes, the guest would stall until its own retransmission timer (the kernel's
RetransSegs would show it). bench/run.py's ``nagle`` workload times the same exchange, also
against slirp4netns and pasta.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, StartSlirp, _read_line
from tests.e2e.test_stats import get_stats

pytestmark = pytest.mark.e2e

EXCHANGES = 50
#: The bench's client and server (bench/netload.py nagle / nagle-serve).
NETLOAD = Path(__file__).resolve().parents[2] / "bench" / "netload.py"


@pytest.fixture
def nagle_server(host: Host) -> Iterator[int]:
    proc = host.ns.popen([sys.executable, str(NETLOAD), "nagle-serve", "--bind", "127.0.0.1",
                          "--port", "0"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        yield int(json.loads(_read_line(proc.stdout, 30, "netload.py nagle-serve"))["port"])
    finally:
        proc.kill()
        proc.wait(10)


def test_a_nagle_client_writing_twice_is_answered_without_retransmitting(
        guest: Guest, start_slirp: StartSlirp, nagle_server: int, tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    start_slirp("--api-socket", str(api))
    retrans_before = guest.counters()["Tcp.RetransSegs"]
    out = guest.run([sys.executable, str(NETLOAD), "nagle", "--host", GATEWAY, "--port",
                     str(nagle_server), "--count", str(EXCHANGES)], timeout=120).stdout
    result = json.loads(out)
    assert result["answered"] == EXCHANGES, "every pair of messages got its answer"
    assert guest.counters()["Tcp.RetransSegs"] == retrans_before, (
        "the guest never had to resend: our ACKs came before its retransmission timer")
    counters = get_stats(api)["counters"]
    # Once: the first exchange whose first message came within the delay of the guest's
    # previous segment waited for the deadline; from then on every ACK went at once.
    assert counters.get("tcp.delayed_ack", 0) == 1, counters
