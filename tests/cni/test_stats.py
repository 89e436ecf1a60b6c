"""``pyslirp stats --cni-rundir``: one container's statistics from the shared engine.

Two containers are attached through the real plugin (libcni's way, tests/cni/cnirun.py);
one holds a TCP connection to a listener of the test on loopback (10.0.2.2 from
inside). Its statistics show the flow, the other's do not: each container is its own stack.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cni.conftest import REPO, slirp_conflist

pytestmark = pytest.mark.e2e

#: In the container: connect, say "open", hold the connection until stdin has a line.
HOLD_TCP = r"""
import socket, sys
s = socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=20)
print("open", flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def stats(rundir: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyslirp", "stats", "--cni-rundir", rundir,
                           *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def stats_json(rundir: str, target: str) -> list[dict[str, Any]]:
    out = stats(rundir, target, "--json")
    assert out.returncode == 0, out.stderr
    attachments: list[dict[str, Any]] = json.loads(out.stdout)
    return attachments


def test_stats_per_container_through_the_engine(runtime_factory: Any, netns_factory: Any,
                                                rundir: str, listener: socket.socket) -> None:
    busy, idle = netns_factory(), netns_factory()
    rt = runtime_factory(slirp_conflist())
    assert rt.add("busy", busy.path).ok
    assert rt.add("idle", idle.path).ok
    port = listener.getsockname()[1]
    holder = busy.popen([sys.executable, "-c", HOLD_TCP, str(port)], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "open\n"
        conn, _ = listener.accept()
        [one] = stats_json(rundir, "busy")
        assert (one["network"], one["containerID"], one["ifname"]) == ("slirptest", "busy", "eth0")
        assert one["flows"]["tcp"] == 1
        assert one["counters"]["tcp.flows_opened"] == 1
        # The other container's stack saw none of it.
        [other] = stats_json(rundir, "idle:eth0")
        assert other["flows"]["tcp"] == 0 and "tcp.flows_opened" not in other["counters"]
        table = stats(rundir, "busy:eth0")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0] == "slirptest busy eth0"
        assert dict(line.split() for line in lines[1:])["flows.tcp"] == "1"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        conn.close()
        deadline = time.monotonic() + 20
        while (flows := stats_json(rundir, "busy")[0]["flows"])["tcp"] + \
                flows["tcp_time_wait"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flows["tcp"] == 0 and flows["tcp_time_wait"] == 0, flows
    finally:
        holder.kill()
        holder.wait(10)
    unknown = stats(rundir, "busy:eth9")
    assert unknown.returncode == 1
    assert "does not serve interface eth9 of container busy" in unknown.stderr
    bad = stats(rundir, "../x")
    assert bad.returncode == 1 and "invalid containerID" in bad.stderr
    assert rt.delete("busy", busy.path).ok
    assert rt.delete("idle", idle.path).ok
