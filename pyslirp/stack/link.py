"""The guest-facing link: where every engine's frames go out.

Theory of operation
-------------------
A :class:`Link` knows the two ends of the virtual wire (our MAC, the guest's
MAC once learned), whether frames carry a virtio-net header, and whether the
peer accepts offloaded (GSO, partial-checksum) frames. Engines build their L4
part and hand it to :meth:`send_ipv4`, which adds the IPv4 and Ethernet
headers (and a plain vnet header) in one buffer, and passes the frame to the
sink the runtime supplied. The TCP, UDP and DNS engines build their frames
from the fused header templates (:mod:`pyslirp.wire.frame`) on their hot paths
and use :meth:`send_frame` directly. :meth:`send_ipv6` is the same for
IPv6 (a 40-byte header, no extension headers): engines call it for the
frames off their hot path (resets, ICMPv6 errors, NDP).

Counters of dropped and notable events live here too (``count``), so that
every engine reports into one table the runtime can log and tests can read.

No frame bigger than the link's MTU leaves :meth:`send_ipv4` or
:meth:`send_ethernet`: one that would is dropped and counted
(``drop.tx.over_mtu``). The guest's kernel would drop it anyway (a TAP or
virtio-net device does not accept frames over its MTU), and a reply whose size
the guest controls (a DHCP option echoed, an ICMP quote) must not become a
frame of any size. The TCP engine's (GSO) frames and the DNS and UDP engines'
templated frames are sized by those engines against the MTU themselves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from pyslirp.stack.config import NetConfig
from pyslirp.wire import ethernet, ipv4, ipv6, vnet
from pyslirp.wire.buffer import Buffer

FrameSink = Callable[[Sequence[Buffer]], None]

_L2_LEN = ethernet.HEADER_LEN
_L3_LEN = ipv4.MIN_HEADER_LEN


class Link:
    def __init__(self, config: NetConfig, sink: FrameSink) -> None:
        self.config = config
        self.sink = sink
        self.our_mac = config.our_mac
        #: Learned from the guest's frames (or ARP); None until then.
        self.guest_mac: bytes | None = config.guest_mac
        self.vnet_hdr = config.vnet_hdr
        self.offload = config.offload and config.vnet_hdr
        self.uso = config.uso and self.offload
        self.mtu = config.mtu
        self.counters: defaultdict[str, int] = defaultdict(int)
        self._ip_ident = 0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def next_ip_id(self) -> int:
        self._ip_ident = (self._ip_ident + 1) & 0xFFFF
        return self._ip_ident

    def send_frame(self, parts: Sequence[Buffer]) -> None:
        """Send one frame; ``parts`` starts with the vnet header when the link has one."""
        self.sink(parts)

    def send_ethernet(self, dst_mac: bytes, ethertype: int, payload: Buffer) -> None:
        if len(payload) > self.mtu:
            self.count("drop.tx.over_mtu")
            return
        head = ethernet.header(dst_mac, self.our_mac, ethertype)
        if self.vnet_hdr:
            self.sink((vnet.PLAIN + head, payload))
        else:
            self.sink((head, payload))

    def send_ipv4(self, src: bytes, dst: bytes, proto: int, l4: Buffer,
                  dst_mac: bytes | None = None, ttl: int = 64,
                  flags: int = ipv4.FLAG_DF, ident: int | None = None) -> bool:
        """Send an IPv4 packet with a complete L4 part to the guest.

        ``flags`` is the whole flags/fragment-offset field and ``ident`` the IP
        ID (default: the next one), so that fragments of one packet can be sent.
        Returns False (and counts it) when the guest's MAC is not known yet, or
        when the packet would be bigger than the link's MTU.
        """
        if _L3_LEN + len(l4) > self.mtu:
            self.count("drop.tx.over_mtu")
            return False
        mac = dst_mac or self.guest_mac
        if mac is None:
            self.count("drop.tx.no_guest_mac")
            return False
        off = vnet.HEADER_LEN if self.vnet_hdr else 0
        head = bytearray(off + _L2_LEN + _L3_LEN)
        if off:
            head[:off] = vnet.PLAIN
        ethernet.build_header(head, off, mac, self.our_mac, ethernet.ETHERTYPE_IPV4)
        ipv4.build_header(head, off + _L2_LEN, src, dst, proto, len(l4),
                          ident=self.next_ip_id() if ident is None else ident, ttl=ttl,
                          flags=flags)
        self.sink((head, l4))
        return True

    def send_ipv6(self, src: bytes, dst: bytes, proto: int, l4: Buffer,
                  dst_mac: bytes | None = None, hop_limit: int = 64) -> bool:
        """Send an IPv6 packet with a complete L4 part to the guest (see :meth:`send_ipv4`)."""
        if ipv6.HEADER_LEN + len(l4) > self.mtu:
            self.count("drop.tx.over_mtu")
            return False
        mac = dst_mac or self.guest_mac
        if mac is None:
            self.count("drop.tx.no_guest_mac")
            return False
        off = vnet.HEADER_LEN if self.vnet_hdr else 0
        head = bytearray(off + _L2_LEN + ipv6.HEADER_LEN)
        if off:
            head[:off] = vnet.PLAIN
        ethernet.build_header(head, off, mac, self.our_mac, ethernet.ETHERTYPE_IPV6)
        ipv6.build_header(head, off + _L2_LEN, src, dst, proto, len(l4), hop_limit)
        self.sink((head, l4))
        return True
