"""TCP, UDP and DNS over IPv6 only: the guest's IPv4 addresses and routes are removed,
pyslirp runs with ``-6``, and every server is on the host namespace's ``::1``
(tests/e2e/servers6.py). ``PYSLIRP_E2E_SIZE`` sets the transfer size (default 20 MB)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e import servers6 as servers6_script
from tests.e2e.conftest import TAP, Guest, Host, StartSlirp
from tests.e2e.test_flows import UDP_REFUSED
from tests.e2e.test_ipv6 import _wait_for_slaac

pytestmark = pytest.mark.e2e

SIZE = int(os.environ.get("PYSLIRP_E2E_SIZE", str(20 << 20)))


@pytest.fixture
def servers6(host: Host) -> Iterator[dict[str, Any]]:
    with servers6_script.running(SIZE, host.ns.popen) as info:
        yield info


def _ipv6_only(start_slirp: StartSlirp, guest: Guest, dns_port: int, *options: str) -> None:
    start_slirp("-6", *options, upstreams=[f"[::1]:{dns_port}"])
    _wait_for_slaac(guest)
    guest.run(["ip", "-4", "route", "flush", "dev", TAP])
    guest.run(["ip", "-4", "addr", "flush", "dev", TAP])


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_http_download_and_upload_over_ipv6(start_slirp: StartSlirp, guest: Guest,
                                            servers6: dict[str, Any], offload: bool) -> None:
    _ipv6_only(start_slirp, guest, servers6["dns"], *(() if offload else ("--no-offload",)))
    url = f"http://[fd00::2]:{servers6['http']}/"
    out = guest.bash(f"curl -sS -g --fail --max-time 300 {url} | sha256sum", timeout=330)
    assert out.stdout.split()[0] == servers6["sha256"]
    upload = guest.tmp / "upload.bin"
    upload.write_bytes(os.urandom(SIZE))
    want = hashlib.sha256(upload.read_bytes()).hexdigest()
    posted = guest.run(["curl", "-sS", "-g", "--fail", "--max-time", "300",
                        "--data-binary", f"@{upload}", url], timeout=330)
    assert posted.stdout.strip() == want


def test_dns_aaaa_and_udp_echo_over_ipv6(start_slirp: StartSlirp, guest: Guest,
                                          servers6: dict[str, Any]) -> None:
    _ipv6_only(start_slirp, guest, servers6["dns"])
    code = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(10)
q = bytes.fromhex("1234010000010000000000000474657374036f726700001c0001")
s.sendto(q, ("fd00::3", 53))
r = s.recv(512)
print(r[:2].hex(), socket.inet_ntop(socket.AF_INET6, r[-16:]))
s.sendto(b"echo six", ("fd00::2", int(sys.argv[1])))
print(s.recv(512).decode())
"""
    out = guest.python(code, str(servers6["echo"]), timeout=60).stdout.split("\n")
    assert out[0] == "1234 fd00::abcd"
    assert out[1] == "echo six"


def test_udp_to_a_closed_port_is_refused_at_once_over_ipv6(
        start_slirp: StartSlirp, guest: Guest, host: Host, servers6: dict[str, Any]) -> None:
    """The host's ICMPv6 port unreachable (IPV6_RECVERR) reaches the guest's socket."""
    _ipv6_only(start_slirp, guest, servers6["dns"])
    out = guest.python(UDP_REFUSED, "fd00::2", str(host.dead), timeout=30).stdout.strip()
    assert out == "ECONNREFUSED"


BIG_ECHO6 = """
import hashlib, os, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.settimeout(10)
blob = os.urandom(4000)
s.sendto(blob, ("fd00::2", int(sys.argv[1])))
got = s.recv(65535)
print(len(got), got == blob)
"""


def test_4000_byte_udp_datagram_goes_and_comes_back_in_fragments(
        start_slirp: StartSlirp, guest: Guest, servers6: dict[str, Any]) -> None:
    """At MTU 1500 the guest's kernel fragments the datagram, pyslirp reassembles it for the
    host socket and fragments the echo back."""
    _ipv6_only(start_slirp, guest, servers6["dns"], "--mtu=1500")
    out = guest.python(BIG_ECHO6, str(servers6["echo"]), timeout=30).stdout.strip()
    assert out == "4000 True"
