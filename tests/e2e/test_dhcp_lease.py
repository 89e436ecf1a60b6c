"""Real DHCP clients in the guest get their lease from pyslirp over tap0.

pyslirp runs without ``-c`` here, so the guest starts with no address; the
clients' hook scripts only record what they were given (they configure
nothing, and never touch the machine's /etc/resolv.conf).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import TAP, Guest, StartSlirp
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e


def _recorder(tmp: Path, out: Path, when: str) -> Path:
    """A client hook that writes its environment to ``out`` once the lease is bound."""
    script = tmp / "hook.sh"
    script.write_text(f'#!/bin/sh\nif [ "$1" = {when} ] || [ "$reason" = {when} ]; then\n'
                      f"  env > {out}.tmp && mv {out}.tmp {out}\nfi\nexit 0\n")
    script.chmod(0o755)
    return script


def _env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k: v.strip("'") for k, v in pairs}


@pytest.fixture
def bare_tap(guest: Guest, start_slirp: StartSlirp) -> Guest:
    """pyslirp serving a tap0 that is up but has no address."""
    start_slirp(configure=False)
    guest.run(["ip", "link", "set", TAP, "up"])
    return guest


def test_udhcpc_gets_the_slirp_lease(bare_tap: Guest) -> None:
    out = bare_tap.tmp / "udhcpc.env"
    hook = _recorder(bare_tap.tmp, out, "bound")
    bare_tap.run(["udhcpc", "-n", "-q", "-f", "-i", TAP, "-s", str(hook), "-t", "5", "-T", "2"],
                 timeout=60)
    lease = _env(out)
    assert lease["ip"] == "10.0.2.15"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "10.0.2.2"
    assert lease["dns"].split() == ["10.0.2.3"]


def test_dhclient_gets_the_slirp_lease(bare_tap: Guest) -> None:
    tmp = bare_tap.tmp
    out = tmp / "dhclient.env"
    hook = _recorder(tmp, out, "BOUND")
    proc = bare_tap.popen(["dhclient", "-1", "-d", "-sf", str(hook), "-lf", str(tmp / "leases"),
                           "-pf", str(tmp / "dhclient.pid"), TAP],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() or proc.poll() is not None, timeout=60, interval=0.05,
                 what="dhclient to bind a lease")
        assert out.exists(), f"dhclient exited {proc.returncode}: {proc.stderr.read()}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    lease = _env(out)
    assert lease["new_ip_address"] == "10.0.2.15"
    assert lease["new_subnet_mask"] == "255.255.255.0"
    assert lease["new_routers"] == "10.0.2.2"
    assert lease["new_domain_name_servers"].split() == ["10.0.2.3"]
