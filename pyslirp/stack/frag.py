"""IPv4 fragment reassembly (guest to us) and fragmentation (us to guest).

Theory of operation
-------------------
:class:`Reassembler` collects the fragments of a guest's IPv4 packet, keyed
by (source, destination, protocol, identification) as RFC 791 section 3.2
says, and hands back the whole packet as ``bytes`` once every byte from 0 to
the end given by the last fragment (MF clear) has arrived. The whole packet's
header is the first fragment's (options included: only it carries them all)
with MF and the offset cleared, the total length set and the checksum
recomputed, so the caller can parse it as if it had arrived in one piece.

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
* at most ``max_size`` (65535) bytes per reassembled packet, header included
  (RFC 791: total length is 16 bits), and at most ``max_fragments`` pieces;
* ``timeout`` (30 s, Linux's ipfrag_time; RFC 1122 section 3.3.2 suggests
  60 to 120) from the first fragment. When a packet times out after its first
  fragment arrived, the guest gets ICMP time exceeded, code 1 (RFC 792;
  RFC 1122 section 3.3.2 SHOULD).

Expiry runs from :meth:`Reassembler.on_timer` when a :class:`Timers` is given,
and in any case lazily on every :meth:`Reassembler.add`, so a caller without
timers still has bounded memory. Packets expire in creation order (the
timeout is constant), so the table is an insertion-ordered dict.

What it does not do: reassemble IPv6, keep per-source quotas (one guest per
link), or reassemble packets we send (we never fragment TCP).

:func:`send_fragmented` goes the other way: it sends an L4 part bigger than
the link MTU as IPv4 fragments (RFC 791 section 3.2, "fragmentation"):
every piece but the last a multiple of 8 bytes with MF set, one IP ID.
"""

from __future__ import annotations

import struct
from bisect import bisect_left

from pyslirp.stack.link import Buffer, Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp, ipv4
from pyslirp.wire.checksum import checksum
from pyslirp.wire.ipv4 import FLAG_DF, FLAG_MF, MIN_HEADER_LEN, Ipv4Packet

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_PACKETS = 64
DEFAULT_MAX_FRAGMENTS = 2048
MAX_PACKET_SIZE = 65535

_U16 = struct.Struct("!H")

_Key = tuple[bytes, bytes, int, int]


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
    """Reassembles fragmented IPv4 packets from the guest. Sans-I/O."""

    __slots__ = ("link", "timers", "timeout", "max_packets", "max_size", "max_fragments",
                 "_packets", "timer_deadline")

    def __init__(self, link: Link, timers: Timers | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_packets: int = DEFAULT_MAX_PACKETS,
                 max_size: int = MAX_PACKET_SIZE,
                 max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        self.link = link
        self.timers = timers
        self.timeout = timeout
        self.max_packets = max_packets
        self.max_size = min(max_size, MAX_PACKET_SIZE)
        self.max_fragments = max_fragments
        self._packets: dict[_Key, _Packet] = {}
        self.timer_deadline: float | None = None

    def __len__(self) -> int:
        """Packets in reassembly (poisoned ones included)."""
        return len(self._packets)

    def add(self, ip: Ipv4Packet, now: float) -> bytes | None:
        """Take one fragment; return the whole packet once complete, else None.

        A packet that is not a fragment is returned as it is.
        """
        if not ip.is_fragment:
            return bytes(ip.buf)
        packets = self._packets
        if packets:
            self._expire(now)
        key = (ip.src, ip.dst, ip.proto, ip.ident)
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
        return self._insert(key, pkt, ip)

    def _insert(self, key: _Key, pkt: _Packet, ip: Ipv4Packet) -> bytes | None:
        start = ip.frag_offset
        data = ip.payload
        size = len(data)
        end = start + size
        more = ip.more_fragments
        link = self.link
        if size == 0 or (more and size & 7):
            # RFC 791: every fragment but the last carries a multiple of 8 bytes.
            return self._abandon(key, pkt, "drop.frag.malformed")
        if ip.header_len + end > self.max_size:
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
            pkt.header = bytes(ip.buf[:ip.header_len])
        if pkt.total is None or pkt.received != pkt.total or pkt.header is None:
            return None
        if len(pkt.header) + pkt.total > self.max_size:
            # Only possible when the first fragment's options made its header longer.
            return self._abandon(key, pkt, "drop.frag.oversize")
        del self._packets[key]
        return _join(pkt.header, pkt.data, pkt.total)

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
                    self._time_exceeded(pkt)

    def _time_exceeded(self, pkt: _Packet) -> None:
        assert pkt.header is not None
        # Quote the first fragment: its header and first 8 bytes (RFC 792).
        quote = pkt.header + pkt.data[0][:8]
        message = icmp.build_error(icmp.TIME_EXCEEDED, 1, quote)
        guest, us = pkt.header[12:16], pkt.header[16:20]
        if us[0] >= 224 or us == self.link.config.broadcast:
            return  # never an ICMP error about a broadcast (RFC 1122 section 3.2.2)
        self.link.send_ipv4(us, guest, ipv4.PROTO_ICMP, message)

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


def _join(header: bytes, pieces: list[bytes], payload_len: int) -> bytes:
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
