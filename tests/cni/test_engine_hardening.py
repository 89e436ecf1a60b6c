"""The CNI engine runs under its seccomp filter and still attaches containers made later.

Guests only talk to 10.0.2.2 (this host's loopback, where the test's HTTP server listens).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cni.conftest import HTTP_BODY, engine_pid, slirp_conflist
from tests.nsutil import NetNS, UserNetNS

pytestmark = pytest.mark.e2e


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _curl(ns: NetNS, port: int) -> subprocess.CompletedProcess[str]:
    return ns.run(["curl", "-sS", "-m", "10", f"http://10.0.2.2:{port}/"], check=False)


def test_engine_is_filtered_and_still_attaches_new_containers(
        runtime_factory: Any, netns_factory: Any, http_port: int, rundir: str) -> None:
    rt = runtime_factory(slirp_conflist())
    first = netns_factory()
    assert rt.add("first", first.path).ok
    pid = engine_pid(rundir)
    assert pid is not None
    status = _status(pid)
    assert (status["Seccomp"], status["NoNewPrivs"]) == ("2", "1"), status
    log = Path(rundir, "engine.log").read_text()
    assert "the following syscalls will be blocked by seccomp: execve " in log
    # Namespaces created after the filter went on, one of them owned by a user namespace
    # of its own: the forked helpers that join them inherit the filter and still work.
    later = netns_factory()
    assert rt.add("later", later.path).ok
    with UserNetNS("cni-filtered") as rootless:
        out = rt.add("rootless", rootless.path)
        assert out.ok, out.doc
        for ns in (first, later, rootless):
            got = _curl(ns, http_port)
            assert got.stdout == HTTP_BODY.decode(), got.stderr
        assert rt.check("rootless", rootless.path).ok
        assert rt.delete("rootless", rootless.path).ok
    for cid, ns in (("first", first), ("later", later)):
        assert rt.delete(cid, ns.path).ok
        assert ns.link("eth0") is None
    assert engine_pid(rundir) in (pid, None)  # never killed by its own filter
    assert "SIGSYS" not in Path(rundir, "engine.log").read_text()
