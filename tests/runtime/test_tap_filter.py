"""The TAP's flood filter (pyslirp.runtime.tapfilter) on a real TAP in a namespace: the
guest's kernel drops exactly the datagrams a FloodFilter names (the flooding flow's, to
anything but the spared addresses, multicast and DHCP), samples them at ``keep``, and
passes every other frame; taken off, everything reaches the reader again.

Traffic goes only to the TAP inside a namespace the test creates.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest

from pyslirp.runtime import tapfilter
from pyslirp.runtime.tap import ConfigureSpec, TapHandle, open_tap
from pyslirp.stack.config import NetConfig
from pyslirp.stack.udp import FloodFilter
from pyslirp.wire import ipv4
from tests import nsutil

pytestmark = pytest.mark.e2e

CONFIG = NetConfig()
FLOOD_PORT = 41000
#: Each datagram's payload names its kind; the flood's carry a number too.
SENDER = """
import socket, sys
n = int(sys.argv[1])
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flood.bind(("10.0.2.100", 41000))
flood.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind(("10.0.2.100", 41001))
for i in range(n):
    flood.sendto(b"flood %d" % i, ("10.0.2.2", 20000 + i))
    if i % 50 == 0:
        flood.sendto(b"dns", ("10.0.2.3", 53))
        flood.sendto(b"broadcast", ("10.0.2.255", 9))
        flood.sendto(b"multicast", ("239.1.2.3", 9))
        flood.sendto(b"dhcp", ("10.0.2.2", 67))
        other.sendto(b"other", ("10.0.2.2", 7000))
        flood.sendto(b"fragment" + b"f" * 3000, ("10.0.2.2", 7001))
t = socket.socket()
t.setblocking(False)
try:
    t.connect(("10.0.2.2", 7002))
except BlockingIOError:
    pass
"""
ROUNDS = 2000
EXTRAS = ROUNDS // 50


@pytest.fixture
def tap() -> Iterator[tuple[nsutil.NetNS, TapHandle]]:
    nsutil.skip_unless_capable()
    with nsutil.NetNS("tapfilter") as ns:
        handle = open_tap(ns.path, "path", mtu=1500, vnet_hdr=False, offload=False,
                          configure=ConfigureSpec.from_netconfig(CONFIG))
        try:
            # Room for every frame a run sends, read or not (a loaded machine may not
            # run the reader for a while); neighbours known: no ARP to answer.
            ns.run(["ip", "link", "set", "tap0", "txqueuelen", "10000"])
            for addr in ("10.0.2.2", "10.0.2.3"):
                ns.run(["ip", "neigh", "replace", addr, "lladdr", "52:55:0a:00:02:02",
                        "dev", "tap0"])
            yield ns, handle
        finally:
            handle.close()


def _send_and_read(ns: nsutil.NetNS, handle: TapHandle) -> dict[str, int]:
    """Run SENDER in the namespace; what reached the TAP's reader, by kind."""
    got: dict[str, int] = {}
    sender = ns.popen(["python3", "-c", SENDER, str(ROUNDS)])

    def drain() -> None:
        while True:
            try:
                frame = os.read(handle.fd, 65536)
            except BlockingIOError:
                return
            if frame[12:14] == b"\x08\x00" and frame[23] == 17:
                offset = (frame[20] << 8 | frame[21]) & 0x1FFF
                if offset:
                    kind = "fragment tail"
                else:
                    kind = bytes(frame[42:60]).split(b" ")[0].rstrip(b"f").decode()
            elif frame[12:14] == b"\x08\x00" and frame[23] == 6:
                kind = "tcp"
            else:
                continue
            got[kind] = got.get(kind, 0) + 1

    while sender.poll() is None:
        select.select([handle.fd], [], [], 0.05)
        drain()
    select.select([handle.fd], [], [], 0.2)
    drain()
    assert sender.returncode == 0
    return got


def _spec(keep: float) -> FloodFilter:
    key = ipv4.addr_from_str("10.0.2.100") + FLOOD_PORT.to_bytes(2, "big")
    return FloodFilter((key,), keep, (CONFIG.dns, CONFIG.broadcast))


def test_the_flooding_flow_is_dropped_unread_and_nothing_else(
        tap: tuple[nsutil.NetNS, TapHandle]) -> None:
    ns, handle = tap
    tapfilter.attach(handle.fd, tapfilter.flood_program(_spec(0.0)))
    got = _send_and_read(ns, handle)
    assert "flood" not in got, got
    for kind in ("dns", "broadcast", "multicast", "dhcp", "other", "fragment"):
        assert got.get(kind) == EXTRAS, (kind, got)
    assert got.get("fragment tail") == 2 * EXTRAS, got  # 3,008 bytes at MTU 1500
    assert got.get("tcp", 0) >= 1  # the SYN
    tapfilter.detach(handle.fd)
    again = _send_and_read(ns, handle)
    assert again.get("flood") == ROUNDS, again


def test_the_flooding_flow_is_sampled_at_keep(tap: tuple[nsutil.NetNS, TapHandle]) -> None:
    ns, handle = tap
    tapfilter.attach(handle.fd, tapfilter.flood_program(_spec(0.25)))
    got = _send_and_read(ns, handle)
    # 2,000 draws at 1/4: 500 expected, sigma 19; these bounds are 7 sigma apart.
    assert 370 <= got.get("flood", 0) <= 630, got
    assert got.get("other") == EXTRAS and got.get("dns") == EXTRAS, got
