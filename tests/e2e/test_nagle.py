"""A guest client using Nagle's algorithm: two small writes back to back, then a read.

The client writes two small messages (TCP_NODELAY off, the default) and then waits for the
answer; the host server answers only once it has both. Nagle holds the second message until
the first is acknowledged, and the host cannot reply before it has the second, so nothing
but the stack's own ACK of the first message can carry the exchange on. A stack that holds
that ACK for a reply (a delayed ACK without a deadline) leaves the guest waiting for its
retransmission timer, which the guest kernel's RetransSegs counts. bench/run.py's ``nagle``
workload times the same exchange against slirp4netns and pasta (a delayed ACK's deadline
shows there as the time per exchange).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, Slirp, _read_line

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
        guest: Guest, slirp: Slirp, nagle_server: int) -> None:
    retrans_before = guest.counters()["Tcp.RetransSegs"]
    out = guest.run([sys.executable, str(NETLOAD), "nagle", "--host", GATEWAY, "--port",
                     str(nagle_server), "--count", str(EXCHANGES)], timeout=120).stdout
    assert json.loads(out)["answered"] == EXCHANGES, "every pair of messages got its answer"
    assert guest.counters()["Tcp.RetransSegs"] == retrans_before, (
        "the guest never had to resend: our ACK of each first message came unprompted")
