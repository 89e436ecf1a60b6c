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
"""

from __future__ import annotations

import struct

from pyslirp.wire import ethernet, ipv4, ipv6

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
