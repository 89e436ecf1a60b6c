"""UDP datagrams keep their boundaries whatever batching happens on the way: a guest
application that sends with UDP_SEGMENT (its kernel hands the TAP one super-frame
when the TAP offers USO) must see the host's peer receive exactly the datagrams it
wrote, nothing merged, cut, changed or lost; with and without offloads, at the
default MTU and at 65520.

The datagrams are compared as multisets, not in order: UDP promises none, and on a
loaded 2-CPU machine the kernel's own paths (the guest's lockless qdisc, loopback's
per-CPU backlogs) were seen to move one datagram of a burst of 60 ahead by up to 21
places about once in ten runs. pyslirp sends each run of the guest's datagrams in
the guest's order (tests/stack/test_udp_batching.py holds that deterministically)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import GATEWAY, Guest, Host, StartSlirp

pytestmark = pytest.mark.e2e

#: The start of every guest script here: the UDP socket ``s`` (room for whole bursts,
#: a 10 s timeout) and ``receive(n)``, up to n datagrams (fewer if one never comes).
GUEST_UDP = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.settimeout(10)

def receive(n):
    got = []
    while len(got) < n:
        try:
            got.append(s.recv(65535))
        except TimeoutError:
            break
    return got
"""

#: The link set-ups every test here runs on.
LINKS = pytest.mark.parametrize("options", [(), ("--mtu", "65520"), ("--no-offload",)],
                                ids=["mtu1500", "mtu65520", "no-offload"])

SEGMENTED_ECHO = GUEST_UDP + """
addr = (sys.argv[1], int(sys.argv[2]))
segment = int(sys.argv[3])
UDP_SEGMENT = 103
s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, segment)
report = []
for batch, count, tail in ((0, 4, 0), (1, 3, 17), (2, 40, 1)):
    sent = [bytes([batch, i]) + bytes((i * 31 + j) & 0xFF for j in range(segment - 2))
            for i in range(count)]
    if tail:
        sent.append(bytes([batch, 255]) * tail)
    s.sendto(b"".join(sent), addr)   # one send call: the kernel cuts it at `segment`
    got = receive(len(sent))
    report.append({"sent": sorted(len(d) for d in sent), "got": sorted(len(d) for d in got),
                   "same": sorted(got) == sorted(sent)})
print(json.dumps(report))
"""


@pytest.mark.parametrize("options,segment", [
    ((), 1000), (("--mtu", "65520"), 1400), (("--no-offload",), 1200)],
    ids=["mtu1500", "mtu65520", "no-offload"])
def test_segmented_sends_arrive_as_the_datagrams_written(host: Host, guest: Guest,
                                                         start_slirp: StartSlirp,
                                                         options: tuple[str, ...],
                                                         segment: int) -> None:
    start_slirp(*options)
    out = guest.python(SEGMENTED_ECHO, GATEWAY, str(host.echo), str(segment)).stdout
    for batch in json.loads(out):
        assert batch["got"] == batch["sent"], "datagram sizes changed on the way"
        assert batch["same"], "datagrams came back changed"


BURST_ECHO = GUEST_UDP + """
addr = (sys.argv[1], int(sys.argv[2]))
# (No empty datagram: the asyncio echo server does not send one back.)
sizes = (1400, 1400, 1400, 1400, 500, 1, 1400, 1400, 7, 1200, 1200, 1200)
bad = missing = 0
for burst in range(10):
    sent = []
    for i in range(60):   # back to back: pyslirp reads them in one batch of frames
        n = sizes[i % len(sizes)]
        d = (bytes([burst, i]) + bytes((i * 13 + j) & 0xFF for j in range(n)))[:n]
        sent.append(d)
        s.sendto(d, addr)
    got = receive(len(sent))
    missing += len(sent) - len(got)
    unmatched = list(sent)
    for d in got:  # each datagram received must be one that was sent (and once)
        if d in unmatched:
            unmatched.remove(d)
        else:
            bad += 1
print(json.dumps({"bad": bad, "missing": missing}))
"""


@LINKS
def test_bursts_of_datagrams_arrive_whole(host: Host, guest: Guest,
                                                       start_slirp: StartSlirp,
                                                       options: tuple[str, ...]) -> None:
    start_slirp(*options)
    out = json.loads(guest.python(BURST_ECHO, GATEWAY, str(host.echo)).stdout)
    assert out == {"bad": 0, "missing": 0}


BLASTER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
sizes = [int(x) for x in sys.argv[1].split(",")]
for _ in range(int(sys.argv[2])):
    _req, peer = s.recvfrom(100)
    # Back to back: they wait in the host socket, and pyslirp reads them as one run.
    for i, n in enumerate(sizes):
        s.sendto((bytes([i & 0xFF]) * n), peer)
"""

RECEIVER = GUEST_UDP + """
addr = (sys.argv[1], int(sys.argv[2]))
sizes = [int(x) for x in sys.argv[3].split(",")]
report = []
for _ in range(int(sys.argv[4])):
    s.sendto(b"go", addr)
    got = receive(len(sizes))
    report.append(sorted(got) == sorted(bytes([i & 0xFF]) * n for i, n in enumerate(sizes)))
print(json.dumps(report))
"""

REPLY_SIZES = ",".join(["1400"] * 50 + ["300"] + ["1200"] * 10 + ["1", "1", "64"])


@LINKS
def test_runs_of_host_datagrams_reach_the_guest_as_sent(host: Host, guest: Guest,
                                                        start_slirp: StartSlirp,
                                                        options: tuple[str, ...]) -> None:
    start_slirp(*options)
    rounds = 5
    blaster = host.ns.popen([sys.executable, "-c", BLASTER, REPLY_SIZES, str(rounds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert blaster.stdout is not None
        port = blaster.stdout.readline().strip()
        out = guest.python(RECEIVER, GATEWAY, port, REPLY_SIZES, str(rounds)).stdout
        assert json.loads(out) == [True] * rounds, "datagrams merged, cut, changed or lost"
    finally:
        blaster.kill()
        blaster.wait()
