"""IPv6 on the link (``-6``): a real guest kernel takes its address and default route from our
router advertisements (SLAAC), pings the gateway and DNS addresses, and ISC dhclient's
stateless DHCPv6 (``-6 -S``) gets the DNS server and search list."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import TAP, Guest, StartSlirp
from tests.e2e.leasehook import lease_hook, read_env
from tests.nsutil import wait_for

pytestmark = pytest.mark.e2e

PREFIX = ipaddress.IPv6Network("fd00::/64")
#: fe80:: + EUI-64 of pyslirp's MAC 52:55:0a:00:02:02 (derived from the IPv4 gateway).
ROUTER_LL = "fe80::2"  # libslirp's router address: slirp4netns guests show "default via fe80::2"
SLAAC_TIMEOUT = 30.0


def _global_addresses(guest: Guest, prefix: ipaddress.IPv6Network) -> list[str]:
    """The guest's usable (not tentative) global addresses inside ``prefix``."""
    out = guest.run(["ip", "-6", "-j", "addr", "show", "dev", TAP]).stdout
    found = []
    for link in json.loads(out or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global" and not info.get("tentative") and \
                    ipaddress.IPv6Address(info["local"]) in prefix:
                found.append(info["local"])
    return found


def _default_route(guest: Guest) -> str:
    return guest.run(["ip", "-6", "route", "show", "default", "dev", TAP]).stdout


def _wait_for_slaac(guest: Guest, prefix: ipaddress.IPv6Network = PREFIX) -> str:
    wait_for(lambda: bool(_global_addresses(guest, prefix)) and
             f"via {ROUTER_LL}" in _default_route(guest),
             timeout=SLAAC_TIMEOUT, interval=0.2,
             what=f"a SLAAC address in {prefix} and a default route")
    return _global_addresses(guest, prefix)[0]


def _ping6(guest: Guest, addr: str) -> None:
    guest.run(["ping", "-6", "-c", "2", "-W", "5", addr], timeout=30)


def test_guest_bringing_its_link_up_gets_slaac_address(start_slirp: StartSlirp,
                                                       guest: Guest) -> None:
    start_slirp("-6", configure=False)
    guest.run(["ip", "link", "set", TAP, "up"])
    addr = _wait_for_slaac(guest)
    assert ipaddress.IPv6Address(addr) in PREFIX
    _ping6(guest, "fd00::2")
    _ping6(guest, "fd00::3")
    _ping6(guest, f"{ROUTER_LL}%{TAP}")


def test_configure_gets_slaac_address(start_slirp: StartSlirp, guest: Guest) -> None:
    slirp = start_slirp("-6")
    _wait_for_slaac(guest)
    _ping6(guest, "fd00::2")
    assert "WARNING" not in slirp.log_text()  # nothing of IPv6 is left unserved


def test_configure_with_other_prefix(start_slirp: StartSlirp, guest: Guest) -> None:
    prefix = ipaddress.IPv6Network("fd12:3456:789a:1::/64")
    start_slirp("-6", f"--cidr6={prefix}")
    _wait_for_slaac(guest, prefix)
    _ping6(guest, str(prefix.network_address + 2))


def test_configure_turns_ipv6_on_where_the_namespace_had_it_off(start_slirp: StartSlirp,
                                                                guest: Guest) -> None:
    guest.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
    start_slirp("-6")
    _wait_for_slaac(guest)
    assert guest.run(["sysctl", "-n", f"net.ipv6.conf.{TAP}.disable_ipv6"]).stdout.strip() == "0"


def test_dhclient_stateless_dhcpv6_gets_dns(start_slirp: StartSlirp, guest: Guest,
                                            tmp_path: Path) -> None:
    if shutil.which("dhclient") is None:
        pytest.skip("dhclient not installed")
    start_slirp("-6")
    _wait_for_slaac(guest)
    # dhclient binds to the link-local address, so it must have passed DAD too.
    wait_for(lambda: not guest.run(["ip", "-6", "addr", "show", "dev", TAP, "tentative"]).stdout,
             timeout=SLAAC_TIMEOUT, interval=0.2, what="the link-local address to pass DAD")
    out = tmp_path / "info.env"
    # dhclient 4.4 reports a stateless Reply as RENEW6 (older versions: INFORM6).
    hook = lease_hook(tmp_path / "hook", out, "RENEW6")
    proc = guest.popen(["dhclient", "-6", "-S", "-d", "-1", "-sf", str(hook),
                        "-lf", str(tmp_path / "leases"), "-pf", str(tmp_path / "pid"), TAP],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(out.exists, timeout=30, interval=0.1, what="dhclient -6 -S to get a Reply")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    env = read_env(out)
    assert env["new_dhcp6_name_servers"] == "fd00::3"
