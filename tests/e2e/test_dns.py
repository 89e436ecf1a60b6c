"""DNS through 10.0.2.3: forwarded to the test's upstream on the host's loopback."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import DNS, Guest, Host, Slirp, StartSlirp
from tests.e2e.servers import TEST_ADDR
from tests.nsutil import NetNS

pytestmark = pytest.mark.e2e


def _name() -> str:
    """A fresh name under test.pyslirp. (no cache can answer it; the upstream log shows it)."""
    return f"t{uuid.uuid4().hex[:12]}.test.pyslirp."


def _dig(guest: Guest, name: str, *opts: str) -> str:
    return guest.run(["dig", "+short", "+tries=1", "+time=10", *opts, f"@{DNS}", name, "A"],
                     timeout=60).stdout.strip()


def _seen(host: Host, name: str) -> list[str]:
    return [line for line in host.dns_log() if f" {name} " in line]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_dig(host: Host, guest: Guest, slirp: Slirp, transport: str) -> None:
    name = _name()
    assert _dig(guest, name, *(["+tcp"] if transport == "tcp" else [])) == TEST_ADDR
    assert _seen(host, name), "the answer did not come from the test's upstream"


def test_nslookup(host: Host, guest: Guest, slirp: Slirp) -> None:
    name = _name()
    out = guest.run(["nslookup", "-timeout=10", name, DNS], timeout=60).stdout
    assert f"Address: {TEST_ADDR}" in out


def test_nxdomain_is_passed_through(host: Host, guest: Guest, slirp: Slirp) -> None:
    out = guest.run(["dig", "+tries=1", "+time=10", f"@{DNS}", "nothing-here.pyslirp.", "A"],
                    timeout=60).stdout
    assert "status: NXDOMAIN" in out


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_failover_from_dead_first_upstream(host: Host, guest: Guest, start_slirp: StartSlirp,
                                           transport: str) -> None:
    start_slirp(upstreams=[host.dead_upstream, host.dns_upstream])
    name = _name()
    assert _dig(guest, name, *(["+tcp"] if transport == "tcp" else [])) == TEST_ADDR
    assert _seen(host, name)


@pytest.fixture
def outside_dns_address(host: Host) -> Iterator[NetNS]:
    """A namespace holding 10.0.2.3, joined to the test's host namespace by a veth: what a
    host network with something at 10.0.2.3 looks like (the traffic stays in our namespaces)."""
    with NetNS("outside") as outside:
        host.run(["ip", "link", "add", "pyslirp-od0", "type", "veth", "peer", "name",
                  "pyslirp-od1", "netns", outside.name])
        try:
            host.run(["ip", "addr", "add", "198.18.9.1/24", "dev", "pyslirp-od0"])
            host.run(["ip", "link", "set", "pyslirp-od0", "up"])
            host.run(["ip", "route", "add", f"{DNS}/32", "via", "198.18.9.2"])
            outside.run(["ip", "addr", "add", "198.18.9.2/24", "dev", "pyslirp-od1"])
            outside.run(["ip", "addr", "add", f"{DNS}/32", "dev", "pyslirp-od1"])
            outside.run(["ip", "link", "set", "pyslirp-od1", "up"])
            outside.run(["ip", "link", "set", "lo", "up"])
            outside.run(["ip", "route", "add", "default", "via", "198.18.9.1"])
            yield outside
        finally:
            host.run(["ip", "link", "del", "pyslirp-od0"], check=False)


def _outside_server(outside: NetNS) -> None:
    """A TCP server at 10.0.2.3:8053 in ``outside`` that says who it is; waits until listening."""
    outside.popen(["ncat", "-lk", DNS, "8053", "-c", "echo outside-10.0.2.3"],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while f"{DNS}:8053" not in outside.run(["ss", "-Htln"]).stdout:
        assert time.monotonic() < deadline, "ncat did not listen"
        time.sleep(0.05)


def test_disable_dns_makes_the_dns_address_an_outside_one_as_slirp4netns(
        host: Host, guest: Guest, start_slirp: StartSlirp, outside_dns_address: NetNS) -> None:
    # libslirp forwards 10.0.2.3 to the host's network once its DNS is off; so do we.
    _outside_server(outside_dns_address)
    start_slirp("--disable-dns")
    out = guest.run(["curl", "-sS", "--max-time", "30", "telnet://10.0.2.3:8053"],
                    check=False, timeout=60).stdout
    assert out.strip() == "outside-10.0.2.3"


def test_dns_address_is_ours_while_dns_is_on(host: Host, guest: Guest, slirp: Slirp,
                                             outside_dns_address: NetNS) -> None:
    _outside_server(outside_dns_address)
    proc = guest.run(["curl", "-sS", "--max-time", "10", "telnet://10.0.2.3:8053"],
                     check=False, timeout=60)
    assert "outside" not in proc.stdout and proc.returncode != 0


def test_disable_dns(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp("--disable-dns")
    name = _name()
    proc = guest.run(["dig", "+short", "+tries=1", "+time=3", f"@{DNS}", name, "A"],
                     check=False, timeout=60)
    assert TEST_ADDR not in proc.stdout
    assert not _seen(host, name)
    # pyslirp itself still works: only the DNS address is off.
    assert guest.run(["curl", "-sS", "--fail", "--max-time", "30", host.url("/hello")]).stdout
