import pytest

from pyslirp.wire import arp
from pyslirp.wire.errors import MalformedPacket

# who-has 10.0.2.2 tell 10.0.2.100, from 02:00:00:00:00:01 (as tcpdump -xx shows it)
REQUEST = bytes.fromhex(
    "0001 0800 06 04 0001 020000000001 0a000264 000000000000 0a000202".replace(" ", ""))


def test_parse_request() -> None:
    p = arp.ArpPacket(memoryview(REQUEST))
    assert p.op == arp.OP_REQUEST
    assert p.sender_mac == bytes.fromhex("020000000001")
    assert p.sender_ip == bytes([10, 0, 2, 100])
    assert p.target_ip == bytes([10, 0, 2, 2])


def test_build_round_trip() -> None:
    built = arp.build(arp.OP_REQUEST, bytes.fromhex("020000000001"), bytes([10, 0, 2, 100]),
                      bytes(6), bytes([10, 0, 2, 2]))
    assert built == REQUEST


@pytest.mark.parametrize("data", [REQUEST[:27], b"\x00\x06" + REQUEST[2:]])
def test_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        arp.ArpPacket(memoryview(data))
