"""ICMPv6 echo to the outside: the guest pings an address in a test server namespace joined
to the host namespace by a veth with 2001:db8:: (documentation) addresses. pyslirp relays
the echo through an unprivileged ICMPv6 datagram socket when the host's
``net.ipv4.ping_group_range`` lets it have one, and answers "administratively prohibited"
when it does not (as for IPv4); pings to fd00::2 are answered locally either way."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import TAP, Guest, Host, StartSlirp
from tests.e2e.test_ipv6 import _wait_for_slaac
from tests.nsutil import NetNS, veth

pytestmark = pytest.mark.e2e

HOST_SIDE = "2001:db8:6::1"
SERVER = "2001:db8:6::2"
_names = itertools.count()


@pytest.fixture
def server6(host: Host) -> Iterator[NetNS]:
    """A namespace on a veth from the host namespace: 2001:db8:6::1 <-> 2001:db8:6::2."""
    with NetNS("srv6") as ns:
        host_if = f"p6h{os.getpid() % 10000}x{next(_names)}"
        veth(host.ns, host_if, ns, "eth0")
        # nodad: the addresses are usable at once, not tentative for a second or two.
        host.run(["ip", "-6", "addr", "add", f"{HOST_SIDE}/64", "dev", host_if, "nodad"])
        ns.run(["ip", "-6", "addr", "add", f"{SERVER}/64", "dev", "eth0", "nodad"])
        yield ns


@pytest.fixture
def ping_range(host: Host) -> Iterator[None]:
    """Let the host namespace's processes (pyslirp, as root: group 0) have ping sockets."""
    key = "net.ipv4.ping_group_range"
    old = host.run(["sysctl", "-n", key]).stdout.split()
    host.run(["sysctl", "-qw", f"{key}=0 2147483647"])
    try:
        yield
    finally:
        host.run(["sysctl", "-qw", f"{key}={old[0]} {old[1]}"])


def _start_ipv6_only(start_slirp: StartSlirp, guest: Guest) -> None:
    start_slirp("-6")
    _wait_for_slaac(guest)
    guest.run(["ip", "-4", "route", "flush", "dev", TAP])
    guest.run(["ip", "-4", "addr", "flush", "dev", TAP])


def _ping6(guest: Guest, addr: str) -> tuple[int, str]:
    proc = guest.run(["ping", "-6", "-n", "-c", "2", "-W", "5", addr], check=False, timeout=30)
    return proc.returncode, proc.stdout + proc.stderr


def test_ping6_to_an_outside_namespace_is_relayed(start_slirp: StartSlirp, guest: Guest,
                                                  server6: NetNS, ping_range: None) -> None:
    _start_ipv6_only(start_slirp, guest)
    status, out = _ping6(guest, SERVER)
    assert status == 0 and "2 received" in out, out
    assert f"from {SERVER}" in out, out
    status, out = _ping6(guest, "fd00::2")
    assert status == 0, out


def test_ping6_where_the_host_refuses_ping_sockets_is_prohibited(
        start_slirp: StartSlirp, guest: Guest, host: Host, server6: NetNS) -> None:
    assert host.run(["sysctl", "-n", "net.ipv4.ping_group_range"]).stdout.split() == ["1", "0"]
    _start_ipv6_only(start_slirp, guest)
    status, out = _ping6(guest, SERVER)
    assert status != 0 and "Administratively prohibited" in out, out
    status, out = _ping6(guest, "fd00::2")
    assert status == 0, out
