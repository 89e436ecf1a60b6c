"""PcapWriter: files that tshark and scapy read back frame for frame."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from pyslirp.runtime.pcap import SNAPLEN, PcapWriter
from pyslirp.wire import vnet

GUEST_MAC = "02:00:00:00:00:01"
GW_MAC = "52:55:0a:00:02:02"


def _syn() -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=GW_MAC) / IP(src="10.0.2.100", dst="10.0.2.2")
                 / TCP(sport=40000, dport=8080, flags="S", seq=1000))


def _udp(payload: bytes) -> bytes:
    return bytes(Ether(src=GW_MAC, dst=GUEST_MAC) / IP(src="10.0.2.3", dst="10.0.2.100")
                 / UDP(sport=53, dport=5353) / payload)


def _tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.fail("tshark is not installed (.ci/run installs it)")
    args = [tshark, "-n", "-r", str(path), "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_frames_read_back_by_tshark_and_scapy(tmp_path: Path) -> None:
    path = tmp_path / "link.pcap"
    syn, udp = _syn(), _udp(b"x" * 100)
    with PcapWriter(str(path)) as w:
        w.write(syn, 1700000000.25)
        w.write(memoryview(udp), 1700000001.5)
    rows = _tshark_fields(path, "frame.time_epoch", "ip.src", "ip.dst", "tcp.flags.syn",
                          "udp.dstport", "frame.len")
    assert len(rows) == 2
    assert rows[0][1:4] == ["10.0.2.100", "10.0.2.2", "1"]
    assert float(rows[0][0]) == pytest.approx(1700000000.25, abs=1e-6)
    assert rows[1][4] == "5353"
    assert int(rows[1][5]) == len(udp)
    packets = rdpcap(str(path))
    assert [bytes(p) for p in packets] == [syn, udp]
    assert float(packets[1].time) == pytest.approx(1700000001.5, abs=1e-6)


def test_scatter_list_with_vnet_header_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "vnet.pcap"
    frame = _udp(b"hello")
    # The vnet header split across parts, as a Link sink may hand it over.
    parts = [vnet.PLAIN[:5], vnet.PLAIN[5:] + frame[:20], bytearray(frame[20:])]
    with PcapWriter(str(path), strip_vnet=True) as w:
        w.write(parts, 10.0)
        w.write(vnet.PLAIN + frame, 11.0)
        w.write(frame, 12.0, strip_vnet=False)
    assert [bytes(p) for p in rdpcap(str(path))] == [frame, frame, frame]


def test_oversized_frame_is_truncated_with_original_length(tmp_path: Path) -> None:
    path = tmp_path / "big.pcap"
    big = _udp(b"\xab" * 2000)
    with PcapWriter(str(path), snaplen=100) as w:
        w.write([big[:60], big[60:]], 5.0)
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, 16)[0] == 100  # snaplen in the global header
    incl_len, orig_len = struct.unpack_from("<II", data, 24 + 8)
    assert (incl_len, orig_len) == (100, len(big))
    assert data[24 + 16:] == big[:100]
    rows = _tshark_fields(path, "frame.len", "frame.cap_len")
    assert rows == [[str(len(big)), "100"]]


def test_default_snaplen_keeps_64k_super_frames_whole(tmp_path: Path) -> None:
    path = tmp_path / "gso.pcap"
    frame = _udp(b"\x01" * 65000)
    with PcapWriter(str(path)) as w:
        w.write(frame, 1.0)
    assert SNAPLEN == 262144
    assert [bytes(p) for p in rdpcap(str(path))] == [frame]


def test_timestamp_rounding_carries_into_seconds(tmp_path: Path) -> None:
    path = tmp_path / "ts.pcap"
    with PcapWriter(str(path)) as w:
        w.write(_syn(), 41.9999996)
    sec, usec = struct.unpack_from("<II", path.read_bytes(), 24)
    assert (sec, usec) == (42, 0)


def test_write_after_close_raises(tmp_path: Path) -> None:
    w = PcapWriter(str(tmp_path / "c.pcap"))
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(_syn(), 0.0)
