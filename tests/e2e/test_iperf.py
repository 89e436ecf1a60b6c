"""iperf3 through pyslirp in both directions: data moves; the rate goes to the log only."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import GATEWAY, IPERF_PORT, Guest, Host, Slirp
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def iperf_server(host: Host) -> Iterator[int]:
    proc = host.ns.popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: host.run(["ss", "-Hltn", f"( sport = :{IPERF_PORT} )"]).stdout.strip()
                 or proc.poll() is not None, what="iperf3 -s to listen")
        assert proc.poll() is None, f"iperf3 -s exited with {proc.returncode}"
        yield IPERF_PORT
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_iperf3(guest: Guest, slirp: Slirp, iperf_server: int, direction: str) -> None:
    args = ["iperf3", "-c", GATEWAY, "-p", str(iperf_server), "-t", "3", "-J"]
    if direction == "download":
        args.append("-R")
    proc = guest.run(args, check=False, timeout=90)
    result = json.loads(proc.stdout)
    assert "error" not in result, result.get("error")
    received = result["end"]["sum_received"]
    assert received["bytes"] > 0
    print(f"iperf3 {direction}: {received['bits_per_second'] / 1e9:.2f} Gbit/s, "
          f"{received['bytes']} bytes, {result['end']['sum_sent'].get('retransmits', 0)} "
          "retransmits")
