"""Bulk TCP through 10.0.2.2: 100 MB down and up with real clients, compared by sha256."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    Guest,
    Host,
    Slirp,
    StartSlirp,
    add_random_loss,
    loss_counts,
    post_file,
    sha256_of_get,
)

pytestmark = pytest.mark.e2e


def test_small_get(host: Host, guest: Guest, slirp: Slirp) -> None:
    out = guest.run(["curl", "-sS", "--fail", "--max-time", "30", host.url("/hello")]).stdout
    assert out.encode() == b"hello from the host\n"


@pytest.mark.parametrize("client", ["curl", "busybox-wget"])
def test_get_100mb_intact(host: Host, guest: Guest, slirp: Slirp, client: str) -> None:
    assert sha256_of_get(guest, host.url("/payload"), client) == host.sha256


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_post_100mb_intact(host: Host, guest: Guest, slirp: Slirp, client: str) -> None:
    got = post_file(guest, host.url("/upload"), host.payload, client)
    assert got == {"bytes": host.size, "sha256": host.sha256}


def test_get_and_post_without_offload(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp("--no-offload")
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256
    assert post_file(guest, host.url("/upload"), host.payload)["sha256"] == host.sha256


def test_get_and_post_at_mtu_65520(host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    # podman and rootlesskit run slirp4netns at this MTU: frames far beyond Ethernet's.
    start_slirp("--mtu=65520")
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256
    assert post_file(guest, host.url("/upload"), host.payload)["sha256"] == host.sha256


def test_100mb_intact_under_2_percent_loss(host: Host, guest: Guest, slirp: Slirp) -> None:
    add_random_loss(guest, 2)
    assert sha256_of_get(guest, host.url("/payload"), timeout=600) == host.sha256
    assert post_file(guest, host.url("/upload"), host.payload, timeout=600.0) == {
        "bytes": host.size, "sha256": host.sha256}
    dropped_in, dropped_out = loss_counts(guest)
    # The loss really happened, both ways, so recovery was exercised.
    assert dropped_in > 0 and dropped_out > 0
    print(f"nftables dropped {dropped_in} packets in, {dropped_out} out")


def test_100mb_intact_with_reordering_and_duplication(
        host: Host, guest: Guest, start_slirp: StartSlirp) -> None:
    start_slirp(env={"PYSLIRP_FAULTS": "drop=0.005,dup=0.01,reorder=0.02,seed=1"})
    before = guest.counters()
    assert sha256_of_get(guest, host.url("/payload")) == host.sha256
    assert post_file(guest, host.url("/upload"), host.payload) == {
        "bytes": host.size, "sha256": host.sha256}
    after = guest.counters()
    # The guest's TCP saw segments out of order, so the injector was really in the path.
    assert after["TcpExt.TCPOFOQueue"] > before["TcpExt.TCPOFOQueue"]
