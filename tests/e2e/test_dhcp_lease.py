"""Real DHCP clients in the guest get their lease from pyslirp over tap0.

pyslirp runs without ``-c`` here, so the guest starts with no address; the
clients' hook scripts only record what they were given (they configure
nothing, and never touch the machine's /etc/resolv.conf).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.e2e.conftest import TAP, Guest, StartSlirp
from tests.e2e.leasehook import lease_hook, read_env
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def bare_tap(guest: Guest, start_slirp: StartSlirp) -> Guest:
    """pyslirp serving a tap0 that is up but has no address."""
    start_slirp(configure=False)
    guest.run(["ip", "link", "set", TAP, "up"])
    return guest


def test_udhcpc_gets_the_slirp_lease(bare_tap: Guest) -> None:
    out = bare_tap.tmp / "udhcpc.env"
    hook = lease_hook(bare_tap.tmp / "hook.sh", out, "bound")
    bare_tap.run(["udhcpc", "-n", "-q", "-f", "-i", TAP, "-s", str(hook), "-t", "5", "-T", "2"],
                 timeout=60)
    lease = read_env(out)
    assert lease["ip"] == "10.0.2.15"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == "10.0.2.2"
    assert lease["dns"].split() == ["10.0.2.3"]


def test_dhclient_gets_the_slirp_lease(bare_tap: Guest) -> None:
    tmp = bare_tap.tmp
    out = tmp / "dhclient.env"
    hook = lease_hook(tmp / "hook.sh", out, "BOUND")
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
    lease = read_env(out)
    assert lease["new_ip_address"] == "10.0.2.15"
    assert lease["new_subnet_mask"] == "255.255.255.0"
    assert lease["new_routers"] == "10.0.2.2"
    assert lease["new_domain_name_servers"].split() == ["10.0.2.3"]
