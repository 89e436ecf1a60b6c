"""Regression tests for what the fuzz harness (tests/fuzz) reports about the stack.

Each input is a byte literal run through the harness's checks
(:mod:`tests.fuzz.stackprog`): no exception may escape, every frame to the guest
is well formed and fits the link, every table stays bounded.
"""

from __future__ import annotations

from pyslirp.wire import dhcp, ethernet, ipv4, udp, vnet
from tests.fuzz import stackprog


def _discover_with_client_id(length: int) -> bytes:
    """A broadcast DHCPDISCOVER whose client identifier (option 61) is ``length`` bytes,
    split over several instances as RFC 3396 allows; the server echoes it (RFC 6842)."""
    mac = bytes.fromhex("020000000064")
    payload = dhcp.build(dhcp.BOOTREQUEST, 0x1234, mac,
                         [(dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.DISCOVER,))),
                          (dhcp.OPT_CLIENT_ID, b"C" * length)])
    l4 = udp.build(bytes(4), 68, b"\xff" * 4, 67, payload)
    ip = bytearray(20 + len(l4))
    ipv4.build_header(ip, 0, bytes(4), b"\xff" * 4, udp.PROTO, len(l4))
    ip[20:] = l4
    return vnet.PLAIN + ethernet.header(ethernet.BROADCAST, mac, 0x0800) + ip


def test_dhcp_reply_with_an_oversized_echoed_option_fits_the_link() -> None:
    frame = _discover_with_client_id(1200)
    assert len(frame) == 12 + 14 + 1482
    stackprog.run_program(0, [("frame", 0, frame)])


# Found by `scripts/fuzz stack` (a libFuzzer timeout), then minimized: the TCP
# handshake of the captured HTTP flow at t = 1000.08 (advance 8 cs, ISS op, SYN,
# connect done, ACK), then 601 s of silence. At now = 1600.08 the keepalive check
# computes idle = now - last_rx = 599.9999999999999 < 600 and re-arms at
# last_rx + 600 = 1600.08 == now: Timers.run fires the flow again at once, forever
# (in the runtime: the event loop spins at 100% CPU). The harness's capped timer
# loop turns the hang into a Violation.
_KEEPALIVE_REARMED_AT_NOW = bytes.fromhex(
    "0001000812ef4575a70003005602000000000000000000000052550a000202d21ee7b2b0"
    "3108004500003ca6b3400040067ba30a0002640a000202caee9c29e0b6c51a00000000a0"
    "02faf03f120000020405b40402080aadec3abe000000000103030a030000030042020000"
    "00000000000000000052550a000202d21ee7b2b031080045000028a6b4400040067bb60a"
    "0002640a000202caee9c29e0b6c51bef4575a85010003f2557000001eac4")


def test_keepalive_timer_never_rearms_at_the_current_time() -> None:
    config, ops = stackprog.decode(_KEEPALIVE_REARMED_AT_NOW)
    assert [op[0] for op in ops] == ["advance", "tcp_iss", "frame", "tcp_connected", "frame",
                                     "advance"]
    stackprog.run_program(config, ops)
