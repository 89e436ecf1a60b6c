"""The virtio-net header a TAP opened with IFF_VNET_HDR puts before each frame.

Theory of operation
-------------------
With ``TUNSETVNETHDRSZ`` = 12 every frame read from or written to the TAP
starts with ``struct virtio_net_hdr_mrg_rxbuf`` (virtio spec 1.1, 5.1.6), in
the host's byte order (little-endian here). It carries the offload state:

* ``NEEDS_CSUM``: the L4 checksum field holds only the pseudo-header sum; the
  real checksum is to be computed from ``csum_start`` and stored at
  ``csum_start + csum_offset``. Frames from the kernel with this flag need no
  verification (the kernel made them); frames we write with it let the kernel
  (or the NIC) finish the checksum.
* ``gso_type``/``gso_size``: a TCP (or UDP) *super-frame* bigger than the MTU
  that is to be cut into ``gso_size`` segments. The kernel hands us such
  frames when TSO is enabled with ``TUNSETOFFLOAD``, and accepts them from us.
"""

from __future__ import annotations

import struct

from pyslirp.wire.errors import MalformedPacket

HEADER_LEN = 12

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_HEADER = struct.Struct("<BBHHHHH")

#: The header for a frame with complete checksums and no segmentation.
PLAIN = _HEADER.pack(0, GSO_NONE, 0, 0, 0, 0, 0)


class VnetHeader:
    __slots__ = ("flags", "gso_type", "hdr_len", "gso_size", "csum_start", "csum_offset")

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < HEADER_LEN:
            raise MalformedPacket(f"vnet: {len(buf)} bytes is shorter than the 12-byte header")
        (self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
         self.csum_offset, _) = _HEADER.unpack_from(buf)


def build(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
          csum_start: int = 0, csum_offset: int = 0) -> bytes:
    return _HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, 0)


def unpack(buf: memoryview | bytes) -> tuple[int, int, int, int, int, int, int]:
    """The raw fields ``(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, n)``."""
    return _HEADER.unpack_from(buf)
