"""DNS through 10.0.2.3: forwarded to the test's upstream on the host's loopback."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.conftest import DNS, Guest, Host, Slirp, StartSlirp
from tests.e2e.servers import TEST_ADDR

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


def test_disable_dns(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp("--disable-dns")
    name = _name()
    proc = guest.run(["dig", "+short", "+tries=1", "+time=3", f"@{DNS}", name, "A"],
                     check=False, timeout=60)
    assert TEST_ADDR not in proc.stdout
    assert not _seen(host, name)
    # pyslirp itself still works: only the DNS address is off.
    assert guest.run(["curl", "-sS", "--fail", "--max-time", "30", host.url("/hello")]).stdout
