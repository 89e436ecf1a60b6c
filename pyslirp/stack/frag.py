"""IP fragment reassembly (guest to us) and fragmentation (us to guest), IPv4 and IPv6.

Theory of operation
-------------------
:class:`Reassembler` collects the fragments of a guest's packet and hands
back the whole packet as ``bytes`` once every byte from 0 to the end given by
the last fragment (MF or M clear) has arrived. One reassembler serves one
address family; what differs between the two is data, a :class:`Family`
(:data:`IPV4`, :data:`IPV6`): how a fragment names its packet, offset and
data, how big a whole packet may be, how long to wait, and how the whole
packet's header is made and an expired one reported.

* IPv4 (RFC 791 section 3.2): keyed by (source, destination, protocol,
  identification). The whole packet's header is the first fragment's
  (options included: only it carries them all) with MF and the offset
  cleared, the total length set and the checksum recomputed. At most 65535
  bytes, header included; 30 s.
* IPv6 (RFC 8200 section 4.5): keyed by (source, destination,
  identification). A fragment is its unfragmentable part (the IPv6 header
  and any extension headers before the Fragment header, which
  :class:`~pyslirp.wire.ipv6.Ipv6Packet` has already walked and checked),
  the Fragment header, and its fragmentable data. The whole packet is the
  first fragment's unfragmentable part with its last Next Header set to the
  Fragment header's and the payload length set, then the data: extension
  headers after the Fragment header are part of the data and are walked when
  the caller parses the whole packet (a second Fragment header there is the
  caller's to drop). A first fragment must hold every header through the
  upper-layer one (RFC 8200, RFC 7112: ``drop.malformed.ipv6`` otherwise).
  At most 65535 bytes of payload (no jumbograms); 60 s (RFC 8200). An
  atomic fragment (offset 0, M clear: RFC 6946) is processed at once, apart
  from any reassembly with the same identification.

The caller parses the whole packet as if it had arrived in one piece.

Fragments of one packet are kept in a list sorted by offset. Stored
fragments never overlap, so checking a new fragment against its two
neighbours is enough to detect any overlap:

* an exact duplicate (same offset, same bytes) is dropped alone, because
  links do duplicate frames (RFC 5722 section 4 allows this);
* any other overlap abandons the whole packet (RFC 5722 spirit, and RFC 8200
  section 4.5 for IPv6): overlapping fragments are how filters are evaded,
  and no honest sender produces them. The packet's key stays *poisoned*
  until its timeout, so that its remaining fragments are dropped too instead
  of starting a new reassembly that could never complete.

What it bounds, and counts through ``link.count`` when it drops:

* at most ``max_packets`` packets in reassembly at once (a new packet beyond
  that is refused, not an old one evicted: evicting would let a flood of
  junk fragments destroy every honest reassembly);
* at most ``max_size`` bytes per reassembled packet (IPv4: 65535, header
  included, RFC 791: total length is 16 bits; IPv6: 65535 of payload) and at
  most ``max_fragments`` pieces;
* ``timeout`` from the first fragment (IPv4: 30 s, Linux's ipfrag_time; RFC
  1122 section 3.3.2 suggests 60 to 120; IPv6: 60 s, RFC 8200). When a
  packet times out after its first fragment arrived, the guest gets ICMP
  (RFC 792; RFC 1122 section 3.3.2 SHOULD) or ICMPv6 (RFC 8200 4.5) time
  exceeded, code 1, quoting that first fragment.

Expiry runs from :meth:`Reassembler.on_timer` when a :class:`Timers` is given,
and in any case lazily on every :meth:`Reassembler.add`, so a caller without
timers still has bounded memory. Packets expire in creation order (the
timeout is constant), so the table is an insertion-ordered dict.

What it does not do: keep per-source quotas (one guest per link), or
reassemble packets we send (we never fragment TCP).

:func:`send_fragmented` goes the other way: it sends an L4 part bigger than
the link MTU as IPv4 fragments (RFC 791 section 3.2, "fragmentation"):
every piece but the last a multiple of 8 bytes with MF set, one IP ID.
:func:`send_fragmented6` does the same for IPv6 (RFC 8200 4.5): each piece
after a Fragment header, the same identification, M set on all but the last.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from bisect import bisect_left
from typing import Any

from pyslirp.stack.link import Buffer, Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp, icmpv6, ipv4, ipv6
from pyslirp.wire.checksum import checksum
from pyslirp.wire.ipv4 import FLAG_DF, FLAG_MF, MIN_HEADER_LEN, Ipv4Packet
from pyslirp.wire.ipv6 import FRAGMENT_HEADER_LEN, Ipv6Packet

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_PACKETS = 64
DEFAULT_MAX_FRAGMENTS = 2048
MAX_PACKET_SIZE = 65535

_U16 = struct.Struct("!H")

_Key = tuple[Any, ...]
#: What a family reads from one fragment: (key, offset, data, more fragments, the length
#: of the header the whole packet will have before ``data``).
_Fields = tuple[_Key, int, memoryview, bool, int]


class Family(ABC):
    """How fragments of one IP version are read and joined (see the module doc)."""

    #: The largest whole packet, counted as :meth:`Reassembler` counts it (header + data).
    max_size = MAX_PACKET_SIZE
    timeout = DEFAULT_TIMEOUT

    def whole(self, ip: Any) -> bytes | None:
        """``ip`` as it is when it is no fragment at all (the caller asked anyway)."""
        return None

    @abstractmethod
    def fields(self, ip: Any) -> _Fields:
        """What :meth:`Reassembler.add` needs of one fragment (see ``_Fields``)."""

    @abstractmethod
    def first_header(self, ip: Any) -> bytes:
        """What to keep of the first fragment (offset 0) to make the whole packet's header."""

    def joined_len(self, header: bytes, payload_len: int) -> int:
        return len(header) + payload_len

    @abstractmethod
    def join(self, header: bytes, pieces: list[bytes], payload_len: int) -> bytes:
        """The whole packet from the first fragment's header and every piece's data."""

    @abstractmethod
    def time_exceeded(self, link: Link, header: bytes, first_data: bytes) -> None:
        """Tell the guest its packet with this first fragment timed out."""


class _Ipv4(Family):
    def whole(self, ip: Ipv4Packet) -> bytes | None:
        return None if ip.is_fragment else bytes(ip.buf)

    def fields(self, ip: Ipv4Packet) -> _Fields:
        return ((ip.src, ip.dst, ip.proto, ip.ident), ip.frag_offset, ip.payload,
                ip.more_fragments, ip.header_len)

    def first_header(self, ip: Ipv4Packet) -> bytes:
        return bytes(ip.buf[:ip.header_len])

    def join(self, header: bytes, pieces: list[bytes], payload_len: int) -> bytes:
        out = bytearray(header)
        hlen = len(header)
        for piece in pieces:
            out += piece
        _U16.pack_into(out, 2, hlen + payload_len)
        # Keep DF as the sender set it; clear MF and the offset.
        _U16.pack_into(out, 6, _U16.unpack_from(out, 6)[0] & FLAG_DF)
        out[10] = out[11] = 0
        _U16.pack_into(out, 10, checksum(memoryview(out)[:hlen]))
        return bytes(out)

    def time_exceeded(self, link: Link, header: bytes, first_data: bytes) -> None:
        # Quote the first fragment: its header and first 8 bytes (RFC 792).
        message = icmp.build_error(icmp.TIME_EXCEEDED, 1, header + first_data[:8])
        guest, us = header[12:16], header[16:20]
        if us[0] >= 224 or us == link.config.broadcast:
            return  # never an ICMP error about a broadcast (RFC 1122 section 3.2.2)
        link.send_ipv4(us, guest, ipv4.PROTO_ICMP, message)


class _Ipv6(Family):
    # The unfragmentable part counts as the header; the payload length is 16 bits.
    max_size = ipv6.HEADER_LEN + MAX_PACKET_SIZE
    timeout = 60.0

    def fields(self, ip: Ipv6Packet) -> _Fields:
        next_header, offset, more, ident = ipv6.fragment_header(ip)
        start = ip.upper_offset
        data = ip.buf[start + FRAGMENT_HEADER_LEN:]
        if offset == 0:
            ipv6.check_first_fragment(next_header, data)
        return (ip.src, ip.dst, ident), offset, data, more, start

    def first_header(self, ip: Ipv6Packet) -> bytes:
        # The unfragmentable part and the Fragment header, as the guest sent them.
        return bytes(ip.buf[:ip.upper_offset + FRAGMENT_HEADER_LEN])

    def joined_len(self, header: bytes, payload_len: int) -> int:
        return len(header) - FRAGMENT_HEADER_LEN + payload_len

    def join(self, header: bytes, pieces: list[bytes], payload_len: int) -> bytes:
        unfragmentable = len(header) - FRAGMENT_HEADER_LEN
        out = bytearray(header[:unfragmentable])
        out[ipv6.next_header_offset(out)] = header[unfragmentable]
        for piece in pieces:
            out += piece
        _U16.pack_into(out, 4, len(out) - ipv6.HEADER_LEN)
        return bytes(out)

    def time_exceeded(self, link: Link, header: bytes, first_data: bytes) -> None:
        guest, us = header[8:24], header[24:40]
        if ipv6.is_multicast(us) or ipv6.is_multicast(guest) or guest == ipv6.UNSPECIFIED:
            return  # RFC 4443 2.4 (e)
        # RFC 4443 2.4 (c): as much of the first fragment as fits the minimum MTU.
        room = ipv6.MIN_MTU - ipv6.HEADER_LEN - icmpv6.HEADER_LEN
        quote = (header + first_data)[:room]
        message = icmpv6.build(icmpv6.TIME_EXCEEDED, 1, bytes(4) + quote, us, guest)
        link.send_ipv6(us, guest, ipv6.PROTO_ICMPV6, message)


IPV4: Family = _Ipv4()
IPV6: Family = _Ipv6()


class _Packet:
    """One packet in reassembly: fragments sorted by offset, never overlapping."""

    __slots__ = ("deadline", "starts", "ends", "data", "header", "total", "received",
                 "poisoned")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.data: list[bytes] = []
        #: The first fragment's header (offset 0), once it arrived.
        self.header: bytes | None = None
        #: Payload length, known once the last fragment (MF clear) arrived.
        self.total: int | None = None
        self.received = 0
        self.poisoned = False

    def poison(self) -> None:
        self.poisoned = True
        self.starts.clear()
        self.ends.clear()
        self.data.clear()
        self.header = None


class Reassembler:
    """Reassembles fragmented packets of one family (IPv4 by default) from the guest."""

    __slots__ = ("link", "timers", "family", "timeout", "max_packets", "max_size",
                 "max_fragments", "_packets", "timer_deadline")

    def __init__(self, link: Link, timers: Timers | None = None, *,
                 family: Family = IPV4, timeout: float | None = None,
                 max_packets: int = DEFAULT_MAX_PACKETS, max_size: int | None = None,
                 max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        self.link = link
        self.timers = timers
        self.family = family
        self.timeout = family.timeout if timeout is None else timeout
        self.max_packets = max_packets
        self.max_size = family.max_size if max_size is None else min(max_size, family.max_size)
        self.max_fragments = max_fragments
        self._packets: dict[_Key, _Packet] = {}
        self.timer_deadline: float | None = None

    def __len__(self) -> int:
        """Packets in reassembly (poisoned ones included)."""
        return len(self._packets)

    def add(self, ip: Any, now: float) -> bytes | None:
        """Take one fragment (an :class:`Ipv4Packet` or an :class:`Ipv6Packet` whose
        ``proto`` is the Fragment header, as the family says); return the whole
        packet once complete, else None.

        A packet that is not a fragment is returned as it is.
        """
        family = self.family
        whole = family.whole(ip)
        if whole is not None:
            return whole
        fields = family.fields(ip)
        if fields[1] == 0 and not fields[3]:  # an atomic fragment (RFC 6946)
            data = fields[2]
            return family.join(family.first_header(ip), [bytes(data)], len(data))
        packets = self._packets
        if packets:
            self._expire(now)
        key = fields[0]
        pkt = packets.get(key)
        if pkt is None:
            if len(packets) >= self.max_packets:
                self.link.count("drop.frag.table_full")
                return None
            pkt = packets[key] = _Packet(now + self.timeout)
            if self.timers is not None and self.timer_deadline is None:
                self.timers.schedule(self, pkt.deadline)
        elif pkt.poisoned:
            self.link.count("drop.frag.poisoned")
            return None
        return self._insert(key, pkt, ip, fields)

    def _insert(self, key: _Key, pkt: _Packet, ip: Any, fields: _Fields) -> bytes | None:
        _key, start, data, more, header_len = fields
        size = len(data)
        end = start + size
        link = self.link
        if size == 0 or (more and size & 7):
            # RFC 791, RFC 8200: every fragment but the last carries a multiple of 8 bytes.
            return self._abandon(key, pkt, "drop.frag.malformed")
        if header_len + end > self.max_size:
            return self._abandon(key, pkt, "drop.frag.oversize")
        total = pkt.total
        if more:
            if total is not None and end > total:
                return self._abandon(key, pkt, "drop.frag.malformed")
        elif total is None:
            if pkt.ends and pkt.ends[-1] > end:
                return self._abandon(key, pkt, "drop.frag.malformed")
        elif end != total:
            return self._abandon(key, pkt, "drop.frag.malformed")

        starts = pkt.starts
        i = bisect_left(starts, start)
        if i < len(starts) and starts[i] == start:
            if pkt.ends[i] == end and pkt.data[i] == data:
                link.count("drop.frag.duplicate")
                return None
            return self._abandon(key, pkt, "drop.frag.overlap")
        if (i > 0 and pkt.ends[i - 1] > start) or (i < len(starts) and starts[i] < end):
            return self._abandon(key, pkt, "drop.frag.overlap")
        if len(starts) >= self.max_fragments:
            return self._abandon(key, pkt, "drop.frag.too_many")

        starts.insert(i, start)
        pkt.ends.insert(i, end)
        # One copy per fragment is unavoidable: the frame buffer is reused.
        pkt.data.insert(i, bytes(data))
        pkt.received += size
        if not more:
            pkt.total = end
        if start == 0:
            pkt.header = self.family.first_header(ip)
        if pkt.total is None or pkt.received != pkt.total or pkt.header is None:
            return None
        if self.family.joined_len(pkt.header, pkt.total) > self.max_size:
            # Only possible when the first fragment's options made its header longer.
            return self._abandon(key, pkt, "drop.frag.oversize")
        del self._packets[key]
        return self.family.join(pkt.header, pkt.data, pkt.total)

    def _abandon(self, key: _Key, pkt: _Packet, reason: str) -> bytes | None:
        """Give up on ``pkt`` (and count why); returns None for ``return self._abandon()``."""
        self.link.count(reason)
        pkt.poison()
        return None

    def _expire(self, now: float) -> None:
        packets = self._packets
        while packets:
            key, pkt = next(iter(packets.items()))
            if pkt.deadline > now:
                return
            del packets[key]
            if not pkt.poisoned:
                self.link.count("drop.frag.timeout")
                if pkt.header is not None:
                    self.family.time_exceeded(self.link, pkt.header, pkt.data[0])

    def on_timer(self, now: float) -> None:
        self._expire(now)
        self._reschedule()

    def _reschedule(self) -> None:
        if self.timers is not None and self._packets:
            self.timers.schedule(self, next(iter(self._packets.values())).deadline)

    def clear(self) -> None:
        """Forget every packet in reassembly (shutdown); nothing is counted."""
        self._packets.clear()
        if self.timers is not None:
            self.timers.cancel(self)


def send_fragmented(link: Link, src: bytes, dst: bytes, proto: int, l4: Buffer,
                    mtu: int | None = None, ttl: int = 64) -> int:
    """Send ``l4`` to the guest in as many IPv4 packets as the MTU needs.

    Returns the number of packets sent (0 if the guest's MAC is unknown or
    ``l4`` cannot fit one IPv4 packet). A part that fits goes out whole, with DF.
    """
    mtu = link.mtu if mtu is None else mtu
    size = len(l4)
    if MIN_HEADER_LEN + size <= mtu:
        return 1 if link.send_ipv4(src, dst, proto, l4, ttl=ttl) else 0
    if MIN_HEADER_LEN + size > MAX_PACKET_SIZE:
        link.count("drop.tx.oversize")
        return 0
    step = (mtu - MIN_HEADER_LEN) & ~7
    ident = link.next_ip_id()
    view = memoryview(l4)
    sent = 0
    for offset in range(0, size, step):
        end = offset + step
        flags = (offset >> 3) | (FLAG_MF if end < size else 0)
        if not link.send_ipv4(src, dst, proto, view[offset:end], ttl=ttl, flags=flags,
                              ident=ident):
            return sent
        sent += 1
    return sent


def send_fragmented6(link: Link, src: bytes, dst: bytes, proto: int, l4: Buffer,
                     mtu: int | None = None) -> int:
    """:func:`send_fragmented` for IPv6: ``l4`` whole if it fits the MTU, else in
    fragments, each after a Fragment header. Returns the number of packets sent."""
    mtu = link.mtu if mtu is None else mtu
    size = len(l4)
    if ipv6.HEADER_LEN + size <= mtu:
        return 1 if link.send_ipv6(src, dst, proto, l4) else 0
    if size + FRAGMENT_HEADER_LEN > MAX_PACKET_SIZE:
        link.count("drop.tx.oversize")
        return 0
    step = (mtu - ipv6.HEADER_LEN - FRAGMENT_HEADER_LEN) & ~7
    ident = link.next_ip_id()
    view = memoryview(l4)
    sent = 0
    for offset in range(0, size, step):
        end = offset + step
        piece = ipv6.build_fragment_header(proto, offset, end < size, ident) + view[offset:end]
        if not link.send_ipv6(src, dst, ipv6.PROTO_FRAGMENT, piece):
            return sent
        sent += 1
    return sent
