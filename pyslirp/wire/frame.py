"""Fused header templates for frames the stack sends to the guest.

Theory of operation
-------------------
The hot path builds each outgoing frame's headers with one
``Struct.pack_into``: Ethernet, a 20-byte IPv4 header (no options) and the
fixed part of the L4 header are laid out back to back in one format, so a
frame costs a single C call instead of one per header. The TCP engine uses
:data:`ETH_IPV4_TCP`; the UDP engine and the DNS forwarder share
:data:`ETH_IPV4_UDP`. Field order: destination MAC, source MAC, ethertype;
version/IHL, TOS, total length, identification, flags/fragment offset, TTL,
protocol, header checksum, source and destination address; then the L4
header (TCP: ports, seq, ack, data offset, flags, window, checksum, urgent
pointer; UDP: ports, length, checksum).

The IPv6 templates (:data:`ETH_IPV6_TCP`, :data:`ETH_IPV6_UDP`) are the same
with the 40-byte IPv6 header in the middle: version/traffic class/flow label
as one 32-bit word, payload length, next header, hop limit, source and
destination address. The engines pick the template by the flow's family, so
one TCP and one UDP engine serve both.

For the TCP segment the engine sends most (data or an ACK, a 20-byte header,
offloads on: header prediction's output half) :data:`VNET_ETH_IPV4_TCP` and
:data:`VNET_ETH_IPV6_TCP` put the virtio-net header in front as one 12-byte
field, so the whole frame header is one ``Struct.pack``. That vnet header
depends only on the family and the flow's MSS (whether the frame is a GSO
super-frame), so it is made once per MSS and kept (:class:`TcpVnetHeaders`).
"""

from __future__ import annotations

import struct

from pyslirp.wire import ethernet, ipv4, ipv6, tcp, vnet

_ETH_IPV4 = "!6s6sH" "BBHHHBBH4s4s"

#: Ethernet + IPv4 (no options) + fixed TCP header.
ETH_IPV4_TCP = struct.Struct(_ETH_IPV4 + "HHIIBBHHH")
#: Ethernet + IPv4 (no options) + UDP header.
ETH_IPV4_UDP = struct.Struct(_ETH_IPV4 + "HHHH")
#: Where the L4 header starts in either template.
L4_START = ethernet.HEADER_LEN + ipv4.MIN_HEADER_LEN

_ETH_IPV6 = "!6s6sH" "IHBB16s16s"

#: Ethernet + IPv6 (no extension headers) + fixed TCP header.
ETH_IPV6_TCP = struct.Struct(_ETH_IPV6 + "HHIIBBHHH")
#: Ethernet + IPv6 (no extension headers) + UDP header.
ETH_IPV6_UDP = struct.Struct(_ETH_IPV6 + "HHHH")
#: Where the L4 header starts in either IPv6 template.
L4_START6 = ethernet.HEADER_LEN + ipv6.HEADER_LEN
#: The first word of an IPv6 header we send: version 6, traffic class and flow label 0.
IPV6_VERSION_WORD = 6 << 28

#: The virtio-net header (12 bytes, built by :class:`TcpVnetHeaders`) + Ethernet +
#: IPv4 (no options) + a TCP header without options.
VNET_ETH_IPV4_TCP = struct.Struct("!12s" + _ETH_IPV4[1:] + "HHIIBBHHH")
#: The same with IPv6 (no extension headers).
VNET_ETH_IPV6_TCP = struct.Struct("!12s" + _ETH_IPV6[1:] + "HHIIBBHHH")


class TcpVnetHeaders(dict[int, bytes]):
    """The vnet header of a TCP frame with a 20-byte TCP header, by GSO size.

    ``headers[0]``: one segment, its checksum left to the kernel (NEEDS_CSUM);
    ``headers[mss]``: a GSO super-frame the kernel cuts into ``mss``-byte segments.
    Made on first use, so a lookup on the per-frame path is a dict subscript.
    """

    def __init__(self, l4_start: int, gso_type: int) -> None:
        super().__init__()
        self.l4_start = l4_start
        self.gso_type = gso_type

    def __missing__(self, gso_size: int) -> bytes:
        if not 0 <= gso_size <= 0xFFFF:
            raise ValueError(f"vnet gso_size {gso_size} outside 0..65535")
        start = self.l4_start
        header = self[gso_size] = vnet.build(
            vnet.F_NEEDS_CSUM, self.gso_type if gso_size else vnet.GSO_NONE,
            start + tcp.HEADER_LEN, gso_size, start, tcp.CSUM_OFFSET)
        return header
