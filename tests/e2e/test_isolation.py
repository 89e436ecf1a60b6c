"""Nobody gets in: no guest traffic reaches the host's loopback through an address trick.

A *trap* in the host namespace listens on TCP ``127.0.0.1:A`` and ``0.0.0.0:B`` and UDP
``0.0.0.0:C`` and never accepts or reads, so the kernel's queues (``ss`` Recv-Q) count
every connection or datagram that got there, whoever made it. The guest then sends,
through an ``AF_PACKET`` socket on its TAP (tests/e2e/isolation_probe.py), SYNs,
datagrams and pings to destinations its own kernel would never route out of the TAP:
127.0.0.0/8, 0.0.0.0/8 (``connect(0.0.0.0)`` reaches loopback on Linux), the limited and
the subnet broadcast, multicast, the network address, the DNS address on ports other
than 53; each whole and as IPv4 fragments. With ``--disable-host-loopback`` the gateway
is one more. Then the same from ordinary sockets (curl, ping, a UDP broadcast).

What we do: none of them gets through, with or without ``--disable-host-loopback``; the
gateway 10.0.2.2 is the only way to the host's loopback, and only without that option.
The guest hears ICMP unreachable (TCP), "administratively prohibited" (ping), or nothing
(UDP, and anything to broadcast or multicast).

slirp4netns 1.2.0 (libslirp 4.7.0) with the same probes (``PYSLIRP_E2E_COMMAND=slirp4netns
pytest tests/e2e/test_isolation.py``, which these tests allow by passing no
``--dns-upstream``) is not as strict: even with ``--disable-host-loopback``, a SYN to
127.0.0.1 or 0.0.0.0 connects to both traps, one to 127.1.2.3 to the 0.0.0.0 one, UDP
to them is delivered and ping is answered (by the host's loopback); without the option,
255.255.255.255 is also carried to the host (it connects to 0.0.0.0, i.e. loopback). It
refuses 0.1.2.3, 10.0.2.255, 224.0.0.1, 10.0.2.0, 10.0.2.77 and 10.0.2.3 off port 53 as
we do. We do not copy that: only a guest that writes raw frames meets the difference
(its kernel never routes 127/8 or 0/8 out of the TAP), and what it gains is exactly what
``--disable-host-loopback`` promises to take away.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import DNS, GATEWAY, TAP, Guest, Host, StartSlirp

pytestmark = pytest.mark.e2e

PROBE = Path(__file__).with_name("isolation_probe.py")

TRAP = """
import json, socket, time
lo = socket.socket(); lo.bind(("127.0.0.1", 0)); lo.listen(64)
anyaddr = socket.socket(); anyaddr.bind(("0.0.0.0", 0)); anyaddr.listen(64)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", 0))
print(json.dumps([s.getsockname()[1] for s in (lo, anyaddr, udp)]), flush=True)
while True:
    time.sleep(3600)
"""

#: Destinations that are never the host's loopback, whatever the options.
TRICK_ADDRESSES = ["127.0.0.1", "127.1.2.3", "0.0.0.0", "0.1.2.3", "255.255.255.255",
                   "10.0.2.255", "224.0.0.1", "10.0.2.0", "10.0.2.77", DNS]


@dataclass
class Trap:
    host: Host
    tcp_loopback: int
    tcp_any: int
    udp_any: int

    def _queued(self, kind: str, port: int) -> int:
        out = self.host.run(["ss", "-Hn", kind, f"sport = :{port}"]).stdout.split()
        return int(out[1]) if out else 0

    def arrivals(self) -> dict[str, int]:
        """Connections waiting in each listener's accept queue, bytes in the UDP socket."""
        return {"tcp 127.0.0.1": self._queued("-lt", self.tcp_loopback),
                "tcp 0.0.0.0": self._queued("-lt", self.tcp_any),
                "udp 0.0.0.0": self._queued("-ua", self.udp_any)}


@pytest.fixture
def trap(host: Host) -> Iterator[Trap]:
    proc = host.ns.popen([sys.executable, "-c", TRAP], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        yield Trap(host, *ports)
    finally:
        proc.kill()
        proc.wait()


def _probe(guest: Guest, probes: list[list[object]]) -> dict[str, object]:
    out = guest.run([sys.executable, str(PROBE), TAP, json.dumps(probes)], timeout=60).stdout
    result: dict[str, object] = json.loads(out)
    return result


def _probes_to(addresses: list[str], trap: Trap) -> list[list[object]]:
    probes: list[list[object]] = []
    for dst in addresses:
        probes += [["tcp", dst, trap.tcp_loopback], ["tcp", dst, trap.tcp_any],
                   ["udp", dst, trap.udp_any], ["icmp", dst, 0]]
    return probes


NOTHING = {"tcp 127.0.0.1": 0, "tcp 0.0.0.0": 0, "udp 0.0.0.0": 0}


@pytest.mark.parametrize("disable_host_loopback", [True, False],
                         ids=["loopback-disabled", "loopback-enabled"])
def test_no_address_trick_reaches_the_hosts_loopback(host: Host, guest: Guest,
                                                     start_slirp: StartSlirp, trap: Trap,
                                                     disable_host_loopback: bool) -> None:
    start_slirp(*(["--disable-host-loopback"] if disable_host_loopback else []), upstreams=[])
    addresses = TRICK_ADDRESSES + ([GATEWAY] if disable_host_loopback else [])
    result = _probe(guest, _probes_to(addresses, trap))
    assert result["done"], result
    assert trap.arrivals() == NOTHING
    replies = {tuple(r) for r in result["replies"]}  # type: ignore[attr-defined]
    # No SYN-ACK, no datagram, and echo replies only from the virtual router and DNS.
    assert not any(proto in ("tcp", "udp") for _src, proto, _detail in replies), replies
    assert {src for src, _proto, detail in replies if detail == "0"} <= {GATEWAY, DNS}


def test_kernel_routed_tricks_reach_nothing_with_loopback_disabled(
        host: Host, guest: Guest, start_slirp: StartSlirp, trap: Trap) -> None:
    """What an ordinary program in the guest can try, through its own kernel's routing."""
    start_slirp("--disable-host-loopback", upstreams=[])
    for addr in (GATEWAY, DNS):
        for port in (trap.tcp_loopback, trap.tcp_any):
            proc = guest.run(["curl", "-sS", "--max-time", "10", f"http://{addr}:{port}/"],
                             check=False)
            assert proc.returncode == 7, proc.stderr  # "Failed to connect": unreachable
    script = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for dst in sys.argv[2:]:
    s.sendto(b"anyone?", (dst, int(sys.argv[1])))
"""
    guest.python(script, str(trap.udp_any), GATEWAY, DNS, "10.0.2.255", "255.255.255.255",
                 "224.0.0.1")
    proc = guest.run(["ping", "-n", "-b", "-c", "1", "-W", "2", "10.0.2.255"], check=False)
    assert "1 received" not in proc.stdout
    # Everything above went out before this probe's sentinel ping came back.
    assert _probe(guest, [])["done"]
    assert trap.arrivals() == NOTHING


def test_gateway_reaches_loopback_when_allowed(host: Host, guest: Guest,
                                               start_slirp: StartSlirp, trap: Trap) -> None:
    """The control: the trap does count what gets in (through the gateway, by design)."""
    start_slirp(upstreams=[])
    result = _probe(guest, [["tcp", GATEWAY, trap.tcp_loopback], ["tcp", GATEWAY, trap.tcp_any],
                            ["udp", GATEWAY, trap.udp_any]])
    assert result["done"], result
    arrivals = trap.arrivals()
    assert arrivals["tcp 127.0.0.1"] == 2 and arrivals["tcp 0.0.0.0"] == 2  # whole + fragmented
    assert arrivals["udp 0.0.0.0"] > 0

