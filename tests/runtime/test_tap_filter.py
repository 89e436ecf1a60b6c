"""The TAP's flood filter (pyslirp.runtime.framefilter) on a real TAP in a namespace: the
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

from pyslirp.runtime import framefilter
from pyslirp.runtime.tap import ConfigureSpec, TapHandle, open_tap
from pyslirp.stack.config import NetConfig
from pyslirp.stack.tcp import SynFloodFilter
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
#: Raw TCP frames on tap0 (as the guest's kernel would send them, each tagged in its
#: payload): plain SYNs to ever new gateway ports, and every kind the filter must pass.
SYN_SENDER = """
import socket, struct, sys
n = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("tap0", 0))
mac = s.getsockname()[4]
def frame(tag, dst="10.0.2.2", port=20000, flags=0x02, src="10.0.2.100", frag=0):
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, flags, 65535, 0, 0) + tag
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, frag, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return b"\\x52\\x55\\x0a\\x00\\x02\\x02" + mac + b"\\x08\\x00" + ip + tcp
for i in range(n):
    s.send(frame(b"flood", port=20000 + i))
    if i % 50 == 0:
        s.send(frame(b"spared", port=7002))
        s.send(frame(b"otherdst", dst="10.0.2.5"))
        s.send(frame(b"synack", flags=0x12))
        s.send(frame(b"ack", flags=0x10))
        s.send(frame(b"rst", flags=0x04))
        s.send(frame(b"othersrc", src="10.0.2.77"))
        s.send(frame(b"fragment", frag=0x2000))
        s.send(frame(b"", port=30000 + i)[:46])  # cut before the flags: malformed
        udp = frame(b"")
        udp = udp[:23] + b"\\x11" + udp[24:34] + struct.pack("!HH", 41000, 30000 + i)
        s.send(udp[:40])  # a UDP header cut short, from the flooding flow
"""
TCP_KINDS = ("spared", "otherdst", "synack", "ack", "rst", "othersrc", "fragment",
             "short tcp", "short udp")


@pytest.fixture
def tap() -> Iterator[tuple[nsutil.NetNS, TapHandle]]:
    nsutil.skip_unless_capable()
    with nsutil.NetNS("framefilter") as ns:
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


def _send_and_read(ns: nsutil.NetNS, handle: TapHandle, sender_code: str = SENDER
                   ) -> dict[str, int]:
    """Run ``sender_code`` in the namespace; what reached the TAP's reader, by kind."""
    got: dict[str, int] = {}
    sender = ns.popen(["python3", "-c", sender_code, str(ROUNDS)])

    def drain() -> None:
        while True:
            try:
                frame = os.read(handle.fd, 65536)
            except BlockingIOError:
                return
            if frame[12:14] == b"\x08\x00" and len(frame) < 42:
                kind = "short udp" if frame[23] == 17 else "short tcp"
            elif frame[12:14] == b"\x08\x00" and frame[23] == 17:
                offset = (frame[20] << 8 | frame[21]) & 0x1FFF
                if offset:
                    kind = "fragment tail"
                else:
                    kind = bytes(frame[42:60]).split(b" ")[0].rstrip(b"f").decode()
            elif frame[12:14] == b"\x08\x00" and frame[23] == 6 and len(frame) < 54:
                kind = "short tcp"
            elif frame[12:14] == b"\x08\x00" and frame[23] == 6:
                tag = bytes(frame[54:62])  # SENDER's own SYN carries options there
                kind = tag.decode() if tag.isascii() and tag.isalpha() else "tcp"
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
    framefilter.attach(handle.fd, framefilter.flood_program(_spec(0.0), None))
    got = _send_and_read(ns, handle)
    assert "flood" not in got, got
    for kind in ("dns", "broadcast", "multicast", "dhcp", "other", "fragment"):
        assert got.get(kind) == EXTRAS, (kind, got)
    assert got.get("fragment tail") == 2 * EXTRAS, got  # 3,008 bytes at MTU 1500
    assert got.get("tcp", 0) >= 1  # the SYN
    framefilter.detach(handle.fd)
    again = _send_and_read(ns, handle)
    assert again.get("flood") == ROUNDS, again


def test_the_flooding_flow_is_sampled_at_keep(tap: tuple[nsutil.NetNS, TapHandle]) -> None:
    ns, handle = tap
    framefilter.attach(handle.fd, framefilter.flood_program(_spec(0.25), None))
    got = _send_and_read(ns, handle)
    # 2,000 draws at 1/4: 500 expected, sigma 19; these bounds are 7 sigma apart.
    assert 370 <= got.get("flood", 0) <= 630, got
    assert got.get("other") == EXTRAS and got.get("dns") == EXTRAS, got


def _syn_spec(keep: float) -> SynFloodFilter:
    gateway = ipv4.addr_from_str("10.0.2.2")
    return SynFloodFilter(ipv4.addr_from_str("10.0.2.100"), (gateway,), ((gateway, 7002),), keep)


def test_a_syn_flood_is_dropped_unread_but_known_peers_and_other_segments_pass(
        tap: tuple[nsutil.NetNS, TapHandle]) -> None:
    ns, handle = tap
    framefilter.attach(handle.fd, framefilter.flood_program(None, _syn_spec(0.0)))
    got = _send_and_read(ns, handle, SYN_SENDER)
    assert "flood" not in got, got
    for kind in TCP_KINDS:
        assert got.get(kind) == EXTRAS, (kind, got)
    # Both filters in one program: each part still does its own.
    framefilter.attach(handle.fd, framefilter.flood_program(_spec(0.0), _syn_spec(0.5)))
    got = _send_and_read(ns, handle, SYN_SENDER)
    assert 800 <= got.get("flood", 0) <= 1200, got  # 2,000 draws at 1/2: sigma 22
    assert {kind: got.get(kind) for kind in TCP_KINDS} == dict.fromkeys(TCP_KINDS, EXTRAS), got
    udp = _send_and_read(ns, handle)
    assert "flood" not in udp and udp.get("other") == EXTRAS, udp
    framefilter.detach(handle.fd)
    assert _send_and_read(ns, handle, SYN_SENDER).get("flood") == ROUNDS
