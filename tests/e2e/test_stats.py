"""Statistics of a running pyslirp: ``get_stats`` on the API socket and ``pyslirp stats``.

The guest opens a TCP connection to the host's echo server and holds it; the
counters and flow gauges must show it while it is open and let it go after it
closed, read both through the raw API command and the ``pyslirp stats``
client in its two formats.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import GATEWAY, REPO, Guest, Host, Slirp, StartSlirp, pyslirp_argv
from tests.e2e.test_hostfwd import api

pytestmark = pytest.mark.e2e

#: In the guest: connect to the echo server, prove it echoes, hold the connection until
#: stdin has a line, then close it.
HOLD_TCP = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.sendall(b"ping\n")
got = b""
while not got.endswith(b"\n"):
    got += s.recv(100)
print("open" if got == b"ping\n" else f"bad echo {got!r}", flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
"""


@pytest.fixture
def api_slirp(start_slirp: StartSlirp, tmp_path: Path) -> tuple[Slirp, Path]:
    path = tmp_path / "api.sock"
    return start_slirp("--api-socket", str(path)), path


@pytest.fixture
def held_tcp(host: Host, guest: Guest) -> Iterator[subprocess.Popen[str]]:
    proc = guest.popen([sys.executable, "-c", HOLD_TCP, GATEWAY, str(host.echo)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def get_stats(path: Path) -> dict[str, Any]:
    reply = json.loads(api(path, b'{"execute":"get_stats"}'))
    stats: dict[str, Any] = reply["return"]
    return stats


def wait_for_stats(path: Path, ok: Callable[[dict[str, Any]], bool],
                   timeout: float = 20.0) -> dict[str, Any]:
    """Poll get_stats until ``ok`` holds (the stack works on its own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = get_stats(path)
        if ok(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def pyslirp_stats(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyslirp_argv("stats", *args), capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def open_held(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline() == "open\n"


def close_held(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "closed\n"


def test_stats_follow_a_tcp_flow_while_it_is_open_and_after_it_closed(
        api_slirp: tuple[Slirp, Path], held_tcp: subprocess.Popen[str]) -> None:
    _slirp, path = api_slirp
    open_held(held_tcp)
    during = get_stats(path)
    assert set(during) == {"counters", "flows"}
    assert set(during["flows"]) == {"tcp", "tcp_time_wait", "udp", "icmp", "dns"}
    assert during["flows"]["tcp"] == 1
    assert during["counters"]["tcp.flows_opened"] == 1
    close_held(held_tcp)
    after = wait_for_stats(path, lambda s: s["flows"]["tcp"] + s["flows"]["tcp_time_wait"] == 0)
    assert after["flows"]["tcp"] == 0 and after["flows"]["tcp_time_wait"] == 0, after
    # Counters only ever go up: the flow that was is still counted.
    assert after["counters"]["tcp.flows_opened"] == 1


def test_pyslirp_stats_prints_a_table_and_json(
        api_slirp: tuple[Slirp, Path], held_tcp: subprocess.Popen[str]) -> None:
    _slirp, path = api_slirp
    open_held(held_tcp)
    as_json = pyslirp_stats("--api-socket", str(path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    stats = json.loads(as_json.stdout)
    assert stats["flows"]["tcp"] == 1 and stats["counters"]["tcp.flows_opened"] == 1
    table = pyslirp_stats("--api-socket", str(path))
    assert table.returncode == 0, table.stderr
    rows = dict(line.split() for line in table.stdout.splitlines())
    assert rows["flows.tcp"] == "1"
    assert rows["flows.udp"] == "0"
    assert rows["tcp.flows_opened"] == "1"
    assert table.stdout.startswith("flows.tcp ")  # the gauges first, then the counters
    close_held(held_tcp)


def test_pyslirp_stats_says_what_is_wrong(tmp_path: Path) -> None:
    missing = pyslirp_stats("--api-socket", str(tmp_path / "nothing.sock"))
    assert missing.returncode == 1
    assert "nothing.sock" in missing.stderr and "No such file" in missing.stderr
    usage = pyslirp_stats("--cni-rundir", str(tmp_path))
    assert usage.returncode == 2 and "CONTAINERID" in usage.stderr
    no_engine = pyslirp_stats("--cni-rundir", str(tmp_path), "ctr1")
    assert no_engine.returncode == 1 and "no pyslirp CNI engine" in no_engine.stderr
