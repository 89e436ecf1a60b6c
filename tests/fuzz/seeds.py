"""The fuzzers' seeds, derived from the real captures in tests/fuzz/seeds/*.pcap.

Theory of operation
-------------------
The committed pcaps (written by ``pyslirp --pcap``, see :mod:`tests.fuzz.capture`)
hold Ethernet frames in both directions without their virtio-net header. A frame
whose source MAC is the gateway's (``52:55:0a:00:02:02``) was sent by the stack;
every other one came from the guest.

Guest frames that the guest's kernel left with a partial checksum (TSO, NEEDS_CSUM)
get their checksums completed (:func:`fix_checksums`), so that every seed is a
frame a parser accepts. From these frames each wire target gets the bytes of its
own layer (:func:`wire_seeds`: the IPv4 packet for ``ipv4``, the UDP payload to port
53 for ``dns``, ...); the stack target gets one program per capture
(:func:`tests.fuzz.stackprog.program_from_capture`).
"""

from __future__ import annotations

import struct
from functools import cache
from pathlib import Path

from pyslirp.wire import ethernet, vnet
from pyslirp.wire.checksum import checksum, partial_sum, pseudo_header_sum

SEED_DIR = Path(__file__).resolve().parent / "seeds"
#: The gateway's MAC with the default 10.0.2.0/24 network (libslirp's 52:55 + 10.0.2.2).
STACK_MAC = bytes.fromhex("52550a000202")

_PCAP_HEADER = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_ETH = ethernet.HEADER_LEN


class Captured:
    """One frame of a capture: when, which way, and the Ethernet frame itself."""

    __slots__ = ("time", "from_guest", "frame")

    def __init__(self, time: float, from_guest: bool, frame: bytes) -> None:
        self.time = time
        self.from_guest = from_guest
        self.frame = frame

    def __repr__(self) -> str:
        way = "guest->stack" if self.from_guest else "stack->guest"
        return f"Captured({self.time:.6f} {way} {len(self.frame)} bytes)"


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """The records of a classic little-endian microsecond pcap (what PcapWriter writes)."""
    data = path.read_bytes()
    magic = _PCAP_HEADER.unpack_from(data)[0]
    if magic != 0xA1B2C3D4:
        raise ValueError(f"{path}: not a little-endian microsecond pcap (magic {magic:#x})")
    out = []
    pos = _PCAP_HEADER.size
    while pos + _RECORD.size <= len(data):
        sec, usec, incl, _orig = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        out.append((sec + usec / 1e6, data[pos:pos + incl]))
        pos += incl
    return out


def fix_checksums(frame: bytes | bytearray) -> bytes:
    """``frame`` (Ethernet) with its IPv4 header and L4 checksums recomputed.

    Anything that is not a well-enough formed IPv4 packet is returned unchanged;
    fragments other than the first keep their L4 bytes (no L4 header there).
    """
    out = bytearray(frame)
    if len(out) < _ETH + 20 or out[12:14] != b"\x08\x00" or out[_ETH] >> 4 != 4:
        return bytes(out)
    ihl = (out[_ETH] & 0x0F) * 4
    total = int.from_bytes(out[_ETH + 2:_ETH + 4], "big")
    if ihl < 20 or total < ihl or _ETH + total > len(out):
        return bytes(out)
    out[_ETH + 10:_ETH + 12] = b"\0\0"
    out[_ETH + 10:_ETH + 12] = checksum(out[_ETH:_ETH + ihl]).to_bytes(2, "big")
    flags_frag = int.from_bytes(out[_ETH + 6:_ETH + 8], "big")
    if flags_frag & 0x3FFF:
        return bytes(out)  # a fragment: its L4 checksum covers the whole packet
    proto = out[_ETH + 9]
    l4 = _ETH + ihl
    end = _ETH + total
    field = {6: 16, 17: 6, 1: 2}.get(proto)
    if field is None or end - l4 < field + 2:
        return bytes(out)
    out[l4 + field:l4 + field + 2] = b"\0\0"
    src, dst = bytes(out[_ETH + 12:_ETH + 16]), bytes(out[_ETH + 16:_ETH + 20])
    initial = 0 if proto == 1 else pseudo_header_sum(src, dst, proto, end - l4)
    csum = (~partial_sum(out[l4:end], initial) & 0xFFFF) or 0xFFFF
    out[l4 + field:l4 + field + 2] = csum.to_bytes(2, "big")
    return bytes(out)


@cache
def captures() -> dict[str, list[Captured]]:
    """Every capture by flow name (dhcp, dns, tcp, ...), checksums completed."""
    found: dict[str, list[Captured]] = {}
    for path in sorted(SEED_DIR.glob("*.pcap")):
        found[path.stem] = [Captured(t, frame[6:12] != STACK_MAC, fix_checksums(frame))
                            for t, frame in read_pcap(path)]
    return found


def all_frames() -> list[Captured]:
    return [c for flow in captures().values() for c in flow]


# ---- per-layer extraction ---------------------------------------------------------

def _ipv4(frame: bytes) -> bytes | None:
    if len(frame) < _ETH + 20 or frame[12:14] != b"\x08\x00":
        return None
    total = int.from_bytes(frame[_ETH + 2:_ETH + 4], "big")
    return frame[_ETH:_ETH + total]


def _l4(ip: bytes, proto: int) -> bytes | None:
    if ip[9] != proto or int.from_bytes(ip[6:8], "big") & 0x3FFF:
        return None
    return ip[(ip[0] & 0x0F) * 4:]


def _udp_payload(frame: bytes, ports: tuple[int, ...]) -> bytes | None:
    ip = _ipv4(frame)
    udp = _l4(ip, 17) if ip else None
    if udp is None or len(udp) < 8:
        return None
    sport, dport = struct.unpack_from("!HH", udp)
    return udp[8:] if sport in ports or dport in ports else None


def _tcp_dns_messages(frame: bytes) -> bytes | None:
    ip = _ipv4(frame)
    seg = _l4(ip, 6) if ip else None
    if seg is None or len(seg) < 20:
        return None
    sport, dport = struct.unpack_from("!HH", seg)
    data = seg[(seg[12] >> 4) * 4:]
    if 53 not in (sport, dport) or len(data) < 14:
        return None
    return data[2:]  # DNS over TCP: a 2-byte length prefix (RFC 1035 4.2.2)


def _vnet_headers(frame: bytes) -> list[bytes]:
    """Each kind of virtio-net header the kernel puts before a frame like ``frame``."""
    out = [vnet.PLAIN, vnet.build(vnet.F_DATA_VALID)]
    if frame[12:14] == b"\x08\x00" and len(frame) > _ETH + 20:
        ihl = (frame[_ETH] & 0x0F) * 4
        field = {6: 16, 17: 6}.get(frame[_ETH + 9])
        if field is not None:
            out.append(vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, 0, 0, _ETH + ihl, field))
        if field == 16 and len(frame) > 1514:
            out.append(vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_TCPV4, _ETH + ihl + 32, 1448,
                                  _ETH + ihl, field))
    return out


def _extract(target: str, frame: bytes) -> list[bytes]:
    ip = _ipv4(frame)
    payload = frame[_ETH:]
    if target == "vnet":
        return _vnet_headers(frame)
    if target == "ethernet":
        return [frame]
    if target == "arp":
        return [payload] if frame[12:14] == b"\x08\x06" else []
    if ip is None:
        return []
    if target == "ipv4":
        return [ip]
    if target == "icmp":
        l4 = _l4(ip, 1)
        return [l4] if l4 else []
    if target in ("udp", "tcp"):
        # These targets verify checksums: their inputs start with the addresses.
        l4 = _l4(ip, {"udp": 17, "tcp": 6}[target])
        return [ip[12:20] + l4] if l4 else []
    if target == "dhcp":
        found = _udp_payload(frame, (67, 68))
        return [found] if found else []
    if target == "dns":
        found = _udp_payload(frame, (53,)) or _tcp_dns_messages(frame)
        return [found] if found else []
    raise ValueError(f"no seeds for target {target!r}")


@cache
def wire_seeds(target: str) -> tuple[bytes, ...]:
    """Distinct seeds for wire target ``target``, in capture order."""
    seen: dict[bytes, None] = {}
    for captured in all_frames():
        for seed in _extract(target, captured.frame):
            seen.setdefault(seed, None)
    if not seen:
        raise ValueError(f"the captures in {SEED_DIR} hold no seed for {target!r}")
    return tuple(seen)
