"""Real DHCP clients (busybox udhcpc, ISC dhclient) get a lease from DhcpServer.

Two throwaway namespaces joined by a veth: the server's end is served by
``tests/e2e/dhcp_bridge.py`` (DhcpServer on a packet socket), the client runs
in the other. The clients' hook scripts write what they were given to a
file, which the test compares with what pyslirp's defaults promise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.leasehook import lease_hook, read_env
from tests.nsutil import NetNS, skip_unless_capable, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SEARCH = ["corp.example.com", "example.com"]


@pytest.fixture
def wire(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    skip_unless_capable()
    lease = getattr(request, "param", 86400)
    with NetNS("dhsrv") as srv, NetNS("dhcli") as cli:
        srv.run(["ip", "link", "add", "vsrv", "type", "veth", "peer", "name", "vcli",
                 "netns", cli.name])
        srv.run(["ip", "link", "set", "vsrv", "up"])
        cli.run(["ip", "link", "set", "vcli", "up"])
        cli.run(["ip", "link", "set", "lo", "up"])
        bridge = srv.popen(
            [sys.executable, "-m", "tests.e2e.dhcp_bridge", "vsrv"]
            + [a for d in SEARCH for a in ("--search", d)] + ["--lease", str(lease)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert bridge.stdout is not None
        assert bridge.stdout.readline().strip() == "ready"
        yield cli, bridge


def _log(bridge: subprocess.Popen[str]) -> list[str]:
    bridge.kill()
    out, _ = bridge.communicate(timeout=10)
    return out.splitlines()


@pytest.mark.parametrize("broadcast", [False, True], ids=["unicast", "broadcast-flag"])
def test_udhcpc_gets_a_lease(wire, tmp_path: Path, broadcast: bool) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("udhcpc") is None:
        pytest.skip("udhcpc not installed")
    cli, bridge = wire
    out = tmp_path / "lease.env"
    hook = lease_hook(tmp_path / "hook", out, "bound")
    cmd = ["udhcpc", "-i", "vcli", "-n", "-q", "-f", "-t", "5", "-T", "1", "-s", str(hook)]
    if broadcast:
        cmd.append("-B")
    cli.run(cmd, timeout=30)
    env = read_env(out)
    assert env["ip"] == "10.0.2.15"
    assert env["subnet"] == "255.255.255.0"
    assert env["router"] == "10.0.2.2"
    assert env["dns"] == "10.0.2.3"
    assert env["serverid"] == "10.0.2.2"
    assert env["lease"] == "86400"
    assert env["mtu"] == "1500"
    assert env["domain"] == "corp.example.com"
    assert env["search"] == " ".join(SEARCH)
    # DISCOVER, OFFER, REQUEST, ACK, nothing else.
    assert _log(bridge) == ["in 1", "out 2", "in 3", "out 5"]


def test_dhclient_gets_a_lease(wire, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("dhclient") is None:
        pytest.skip("dhclient not installed")
    cli, bridge = wire
    out = tmp_path / "lease.env"
    hook = lease_hook(tmp_path / "hook", out, "BOUND")
    proc = cli.popen(["dhclient", "-d", "-1", "-sf", str(hook), "-lf", str(tmp_path / "leases"),
                      "-pf", str(tmp_path / "pid"), "vcli"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out.exists, timeout=30, what="dhclient to bind")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    env = read_env(out)
    assert env["new_ip_address"] == "10.0.2.15"
    assert env["new_subnet_mask"] == "255.255.255.0"
    assert env["new_routers"] == "10.0.2.2"
    assert env["new_domain_name_servers"] == "10.0.2.3"
    assert env["new_dhcp_server_identifier"] == "10.0.2.2"
    assert env["new_dhcp_lease_time"] == "86400"
    assert env["new_interface_mtu"] == "1500"
    assert env["new_domain_name"] == "corp.example.com"
    assert env["new_domain_search"] == "corp.example.com. example.com."
    log = _log(bridge)
    assert log[:4] == ["in 1", "out 2", "in 3", "out 5"]


@pytest.mark.parametrize("wire", [6], indirect=True)
def test_udhcpc_renews_by_unicast(wire, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With a short lease udhcpc renews (RENEWING: ciaddr, unicast) and is ACKed again.

    busybox clamps how soon it renews, so this takes about 15 s whatever the lease.
    """
    if shutil.which("udhcpc") is None:
        pytest.skip("udhcpc not installed")
    cli, bridge = wire
    out = tmp_path / "renew.env"
    hook = tmp_path / "hook"
    # Configure the address (the renewal goes out through the kernel's UDP stack) and
    # record the renewal; the gateway's MAC is static since nobody answers ARP here.
    hook.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  bound) ip addr add "$ip/$mask" dev "$interface"\n'
        '         ip neigh replace "$serverid" lladdr 52:55:0a:00:02:02 dev "$interface" ;;\n'
        f'  renew) env > {out}.tmp && mv {out}.tmp {out} ;;\n'
        "esac\nexit 0\n")
    hook.chmod(0o755)
    proc = cli.popen(["udhcpc", "-i", "vcli", "-f", "-t", "5", "-T", "1", "-s", str(hook)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out.exists, timeout=30, what="udhcpc to renew")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    env = read_env(out)
    assert env["ip"] == "10.0.2.15" and env["lease"] == "6"
    assert _log(bridge)[:6] == ["in 1", "out 2", "in 3", "out 5", "in 3", "out 5"]
