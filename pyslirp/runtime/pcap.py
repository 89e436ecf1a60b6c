"""Write the frames crossing the guest link to a classic pcap file (``--pcap``).

Theory of operation
-------------------
The file is the classic libpcap format (magic ``0xa1b2c3d4``, version 2.4,
microsecond timestamps, ``LINKTYPE_ETHERNET``, snaplen 262144), which every
reader (tshark, tcpdump, scapy's ``rdpcap``) understands. Each record is a
16-byte header ``(ts_sec, ts_usec, incl_len, orig_len)`` followed by
``incl_len`` bytes of the frame; a frame longer than the snaplen is cut to
``incl_len = snaplen`` while ``orig_len`` keeps its real length.

Frames come as the link carries them: one buffer, or a sequence of buffers
(the scatter list a :class:`pyslirp.stack.link.Link` hands its sink), each
optionally starting with the 12-byte virtio-net header. With
``strip_vnet=True`` the writer skips those 12 bytes, which may span buffers.
The frames themselves are written as they are: a TSO super-frame (up to
64 KiB, with only the pseudo-header sum in its TCP checksum field) appears as
one big frame, exactly what the stack saw or sent, and readers will flag its
checksum as unverified; that is the truth of the link, not a capture error.

Writes go through a buffered file; :meth:`close` (or leaving the ``with``
block) flushes. Capturing is a debugging aid, not the hot path: it costs a
``write`` per buffer, which is why the runtime only installs a writer when
``--pcap`` was given.

Not done on purpose: pcapng, nanosecond timestamps, rotation, capture
filters.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

from pyslirp.wire import vnet
from pyslirp.wire.buffer import Buffer

Frame = Buffer | Sequence[Buffer]

MAGIC = 0xA1B2C3D4
VERSION_MAJOR = 2
VERSION_MINOR = 4
LINKTYPE_ETHERNET = 1
SNAPLEN = 262144

_GLOBAL_HEADER = struct.Struct("<IHHiIII")
_RECORD_HEADER = struct.Struct("<IIII")


def _split_timestamp(timestamp: float) -> tuple[int, int]:
    sec = int(timestamp)
    usec = round((timestamp - sec) * 1_000_000)
    if usec >= 1_000_000:  # rounding 0.9999996 up must carry into the seconds
        sec += 1
        usec -= 1_000_000
    return sec, usec


class PcapWriter:
    """Append Ethernet frames with their timestamps to a new pcap file at ``path``.

    ``strip_vnet`` drops the leading virtio-net header of every frame (set it
    when the link has ``vnet_hdr``); ``write(..., strip_vnet=...)`` overrides it
    per frame.
    """

    __slots__ = ("path", "snaplen", "strip_vnet", "frames", "_file")

    def __init__(self, path: str, *, strip_vnet: bool = False, snaplen: int = SNAPLEN) -> None:
        if snaplen <= 0:
            raise ValueError(f"pcap snaplen must be positive, not {snaplen}")
        self.path = path
        self.snaplen = snaplen
        self.strip_vnet = strip_vnet
        #: Number of frames written so far.
        self.frames = 0
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(_GLOBAL_HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0, 0,
                                             snaplen, LINKTYPE_ETHERNET))

    def write(self, frame: Frame, timestamp: float, *, strip_vnet: bool | None = None) -> None:
        """Record one frame seen at ``timestamp`` (seconds since the epoch)."""
        f = self._file
        if f is None:
            raise ValueError(f"pcap file {self.path} is closed")
        parts: Sequence[Buffer] = (frame,) if isinstance(frame, bytes | bytearray | memoryview) \
            else frame
        skip = vnet.HEADER_LEN if (self.strip_vnet if strip_vnet is None else strip_vnet) else 0
        # Byte lengths (nbytes, not len) so that a memoryview of another format still counts right.
        sizes = [memoryview(p).nbytes for p in parts]
        orig_len = max(sum(sizes) - skip, 0)
        incl_len = min(orig_len, self.snaplen)
        sec, usec = _split_timestamp(timestamp)
        f.write(_RECORD_HEADER.pack(sec, usec, incl_len, orig_len))
        left = incl_len
        for part, size in zip(parts, sizes, strict=True):
            if skip >= size:
                skip -= size
                continue
            view = memoryview(part).cast("B")
            end = min(size, skip + left)
            f.write(view[skip:end])
            left -= end - skip
            skip = 0
            if not left:
                break
        self.frames += 1

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and close; further writes raise ``ValueError``. Closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
