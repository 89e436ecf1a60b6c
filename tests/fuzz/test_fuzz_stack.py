"""Bounded fuzzing of the whole stack: guest frames and host events in, frames and host
calls out (see tests/fuzz/stackprog.py for the program model and the checks).

Programs are the captured flows replayed with edits, or random operations; the same
ones every run. After each operation every table and buffer is within its bound and
every frame sent to the guest is well formed; at the end everything times out and the
stack holds nothing. The long, coverage-guided run is ``scripts/fuzz stack``.
"""

from __future__ import annotations

from hypothesis import given

from pyslirp.wire import ethernet, ipv4, tcp, udp, vnet
from tests.fuzz import stackprog
from tests.fuzz.strategies import bounded, stack_program

EXAMPLES = 600


def test_captured_flows_replay_cleanly() -> None:
    for program in stackprog.stack_seeds():
        config, ops = stackprog.decode(program)
        assert stackprog.encode(config, ops) == program
        stackprog.run_program(config, ops)


@bounded(EXAMPLES)
@given(stack_program())
def test_random_programs_keep_the_stack_consistent(
        program: tuple[int, list[stackprog.Op]]) -> None:
    stackprog.run_program(*program)


@bounded(60)
@given(stack_program())
def test_any_bytes_are_a_program(program: tuple[int, list[stackprog.Op]]) -> None:
    """What atheris feeds the stack target: the encoding round-trips, and runs."""
    data = stackprog.encode(*program)
    config, ops = stackprog.decode(data)
    assert stackprog.encode(config, ops) == data
    stackprog.fuzz_stack(data)


_GUEST = bytes((10, 0, 2, 100))
_GUEST_MAC = bytes.fromhex("020000000064")


def _frame(dst: bytes, proto: int, l4: bytes | bytearray) -> bytes:
    ip = bytearray(20 + len(l4))
    ipv4.build_header(ip, 0, _GUEST, dst, proto, len(l4))
    ip[20:] = l4
    eth = ethernet.header(bytes.fromhex("52550a000202"), _GUEST_MAC, ethernet.ETHERTYPE_IPV4)
    return vnet.build(vnet.F_DATA_VALID) + eth + ip


def _tcp_syn(src_port: int, dst: bytes) -> bytes:
    return _frame(dst, tcp.PROTO, tcp.build(_GUEST, dst, src_port, 80, 1, 0, tcp.SYN, 65535))


def _udp(src_port: int, dst: bytes, dst_port: int, payload: bytes) -> bytes:
    return _frame(dst, udp.PROTO, udp.build(_GUEST, src_port, dst, dst_port, payload))


def _dns_query(ident: int) -> bytes:
    # RD set, one question: "a." type A class IN.
    return (ident.to_bytes(2, "big") + bytes.fromhex("01000001000000000000")
            + b"\x01a\x00\x00\x01\x00\x01")


def test_floods_stay_within_the_configured_limits() -> None:
    """Thousands of new SYNs, UDP flows and DNS queries: every table stops at its limit
    (checked after each frame), and all of it times out afterwards."""
    remote = bytes((198, 18, 0, 1))
    dns = bytes((10, 0, 2, 3))
    runner = stackprog.Runner(0)
    for i in range(1500):
        runner.op(("frame", 0, _tcp_syn(1024 + i, remote)))
        runner.op(("frame", 0, _udp(1024 + i, remote, 9, b"x")))
        runner.op(("frame", 0, _udp(1024 + i, dns, 53, _dns_query(i))))
    tcp = runner.stack.tcp
    assert len(tcp.flows) == tcp.half_open == tcp.cfg.max_half_open
    assert 0 < len(runner.stack.udp.flows) < 1500  # the new-flow rate limit held
    assert len(runner.stack.dns.pending) == runner.stack.dns.max_pending
    runner.drain()
