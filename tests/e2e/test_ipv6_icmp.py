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


# ---- packet too big: a router on the host's side with a smaller link beyond it ------------

NARROW_MTU = 1280

PMTU_PROBE = """
import socket, sys, time
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU = 23, 2, 24
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)  # never fragment
s.connect((sys.argv[1], 9))
mtu, deadline = 0, time.monotonic() + 15
while time.monotonic() < deadline:
    try:
        s.send(bytes(1400))
    except OSError:
        pass  # EMSGSIZE once the path MTU is known: what we wait for
    time.sleep(0.3)
    mtu = s.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU)
    if mtu < 1500:
        break
print(mtu)
"""


@pytest.fixture
def narrow_path(host: Host) -> Iterator[str]:
    """host --(1500)-- router --(1280)-- server: the router answers a 1400-byte packet to
    the server with ICMPv6 packet too big (MTU 1280). Yields the server's address."""
    with NetNS("rtr6") as router, NetNS("far6") as far:
        host_if = f"p6r{os.getpid() % 10000}x{next(_names)}"
        veth(host.ns, host_if, router, "up0")
        veth(router, "down0", far, "eth0")
        for ns, ifname in ((router, "down0"), (far, "eth0")):
            ns.run(["ip", "link", "set", "dev", ifname, "mtu", str(NARROW_MTU)])
        host.run(["ip", "-6", "addr", "add", "2001:db8:7::1/64", "dev", host_if, "nodad"])
        router.run(["ip", "-6", "addr", "add", "2001:db8:7::2/64", "dev", "up0", "nodad"])
        router.run(["ip", "-6", "addr", "add", "2001:db8:8::1/64", "dev", "down0", "nodad"])
        far.run(["ip", "-6", "addr", "add", "2001:db8:8::2/64", "dev", "eth0", "nodad"])
        router.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        far.run(["ip", "-6", "route", "add", "default", "via", "2001:db8:8::1"])
        # Gone with the veth when the router's namespace is deleted.
        host.run(["ip", "-6", "route", "add", "2001:db8:8::/64", "via", "2001:db8:7::2"])
        yield "2001:db8:8::2"


def test_packet_too_big_beyond_the_host_reaches_the_guest(start_slirp: StartSlirp,
                                                          guest: Guest,
                                                          narrow_path: str) -> None:
    """The host's UDP socket learns the path MTU from the router's ICMPv6 packet too big
    (IPV6_RECVERR); the guest's kernel learns it from ours: its socket's path MTU drops
    from the link's 1500 to 1280."""
    _start_ipv6_only(start_slirp, guest)
    out = guest.python(PMTU_PROBE, narrow_path, timeout=40).stdout.strip()
    assert out == str(NARROW_MTU)
