"""The stack: one virtual network (one guest link) and every engine serving it.

Theory of operation
-------------------
:meth:`Stack.receive_frame` is the single entry point for frames from the
guest. It strips the virtio-net header (noting whether the guest's kernel
left the L4 checksum to us to trust: NEEDS_CSUM or DATA_VALID), parses
Ethernet, learns the guest's MAC, answers ARP itself, and demultiplexes IPv4:

* fragments go to the :class:`~pyslirp.stack.frag.Reassembler` first;
* UDP to port 67 goes to the DHCP server, UDP to the DNS address's port 53
  to the DNS forwarder, any other UDP to the UDP NAT;
* TCP goes to the TCP engine (which also carries DNS over TCP, through the
  address policy below); ICMP to the ICMP engine.

A UDP super-frame (vnet ``GSO_UDP_L4``: a guest socket sent with
``UDP_SEGMENT`` and the TAP offers USO) is told apart by the header's gso_type
before anything else and goes to the UDP NAT with its ``gso_size``, which keeps
the datagrams apart; to the DHCP server, the DNS forwarder or broadcast, where
no real client sends segmented, it is dropped (``drop.udp.segmented_local``).

Malformed frames raise :class:`MalformedPacket` inside the wire views; they
are caught here, counted by kind (``drop.malformed.<layer>``) and dropped, so
one bad frame never disturbs another flow.

Any other exception out of an engine is a bug, but the guest must not be able
to turn it into a denial of service (a traceback per frame in the log, or a
QEMU stream losing its framing because the runtime's read loop was cut
short). So :meth:`Stack.receive_frame` never raises: the frame is dropped,
counted (``stack.error.<ExceptionType>``) and logged with its traceback at
most once per :data:`ERROR_LOG_INTERVAL` seconds per exception type (of the
``now`` passed in: the stack reads no clock); the next report says how many
were not logged meanwhile.

The address policy (:meth:`Stack.host_targets`) is the NAT's one decision,
shared by every engine: what host address a guest destination maps to.
The gateway address is the host's loopback (unless ``disable_host_loopback``),
the DNS address on port 53 is the upstream resolvers, other addresses inside
the virtual network are unreachable, and everything else is itself. With
``disable_dns`` the DNS address is not ours any more and, as libslirp does,
is an outside address like any other (slirp4netns's guest then reaches
whatever answers at 10.0.2.3 on the host's network, usually nothing: a
connect times out). ARP and ping are still answered for it, as by libslirp.

IPv6 (``config.enable_ipv6``; ethertype 0x86DD, tested after IPv4 and ARP so
the IPv4 path pays nothing for it): :meth:`Stack._receive_ipv6` parses the
packet and its extension headers (:class:`~pyslirp.wire.ipv6.Ipv6Packet`),
lets the NDP engine learn the guest's address, and delivers what is addressed
to us: to one of our unicast addresses (gateway, DNS, our link-local), to
all-nodes, all-routers, the solicited-node groups of our addresses, or
All_DHCP_Relay_Agents_and_Servers. ICMPv6 goes to the
:class:`~pyslirp.stack.ndp.NdpEngine` (neighbor and router discovery, echo),
UDP to port 547 to the :class:`~pyslirp.stack.dhcpv6.Dhcpv6Server`, UDP to
the DNS address's port 53 to the DNS forwarder. TCP and other unicast UDP
go to the same TCP and UDP engines as IPv4 (``handle6``), whatever their
destination: the address policy decides, as for IPv4. So does ICMPv6 to a
unicast address not ours, which goes to the ICMP engine (echo relayed to the
outside). IPv6 fragments go to a second
:class:`~pyslirp.stack.frag.Reassembler` (the IPv6 family) first; the whole
packet is then parsed and handled as if it had come in one piece (a Fragment
header inside it again is ``drop.frag.nested``). Anything else is dropped
(``drop.ipv6.<why>``). Without ``enable_ipv6`` every IPv6 frame is
``drop.ethertype``, as before.

The IPv6 address policy (:meth:`Stack.host_targets` for a 16-byte address):
the gateway ``fd00::2`` and our link-local address are the host's ``::1``
(unless ``disable_host_loopback``), the DNS address ``fd00::3`` on port 53 is
the upstream resolvers (with ``disable_dns`` an outside address, as for IPv4);
the rest of the prefix, IPv4-mapped addresses (``::ffff:0:0/96``: the host
socket would reach IPv4, loopback included),
the unspecified address, the loopback ``::1`` (the guest names the host's
loopback only through the gateway), other link-local addresses (they are on
the guest's link, not ours) and multicast never reach the host.

ARP (RFC 826): we answer requests for the gateway and DNS addresses only, as
libslirp does (the guest reaches everything else through the gateway), each
with libslirp's MAC for it (``52:55`` and the address, so the DNS address is
at ``52:55:0a:00:02:03``). We learn the
guest's MAC from every frame it sends; before sending to a guest whose MAC is
unknown, :meth:`Stack.resolve_guest` broadcasts a request.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable

from pyslirp.stack.config import NetConfig
from pyslirp.stack.dhcp import DhcpServer
from pyslirp.stack.dhcpv6 import Dhcpv6Server, udp6_datagram
from pyslirp.stack.dns import DnsForwarder
from pyslirp.stack.frag import IPV6, Reassembler
from pyslirp.stack.host import HostPort
from pyslirp.stack.icmp import IcmpEngine
from pyslirp.stack.link import FrameSink, Link
from pyslirp.stack.ndp import NdpEngine
from pyslirp.stack.tcp import TcpEngine
from pyslirp.stack.timers import Timers
from pyslirp.stack.udp import UdpEngine
from pyslirp.wire import arp, ethernet, ipv4, ipv6, vnet
from pyslirp.wire.dhcpv6 import SERVER_PORT as DHCPV6_SERVER_PORT
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Ipv4Packet
from pyslirp.wire.udp import UdpDatagram

_CSUM_TRUSTED = vnet.F_NEEDS_CSUM | vnet.F_DATA_VALID
#: The vnet header's gso_type without its ECN bit.
_GSO_TYPE = ~vnet.GSO_ECN & 0xFF
#: Destination MAC, source MAC, ethertype: read here rather than through
#: ethernet.EthernetFrame (two calls and an object fewer per frame).
_ETH_HEADER = struct.Struct("!6s6sH")
_ETH_LEN = ethernet.HEADER_LEN
#: More-fragments flag or a fragment offset (Ipv4Packet.is_fragment, inline).
_FRAGMENT_BITS = ipv4.FLAG_MF | ipv4.OFFSET_MASK
_LOOPBACK = "127.0.0.1"
_LOOPBACK6 = "::1"
_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_UNSPECIFIED6 = bytes(16)
_LOOPBACK6_ADDR = bytes(15) + b"\x01"
_DHCP_SERVER_PORT = 67
_DNS_PORT = 53
_DHCP_PORT_BYTES = _DHCP_SERVER_PORT.to_bytes(2, "big")
#: At most one traceback per exception type in this many seconds (see the module doc).
ERROR_LOG_INTERVAL = 10.0

log = logging.getLogger("pyslirp")


class ErrorReporter:
    """Counts unexpected exceptions and logs them, rate-limited per exception type."""

    def __init__(self, counters: dict[str, int], interval: float = ERROR_LOG_INTERVAL) -> None:
        self._counters = counters
        self.interval = interval
        #: Exception type name -> (when its traceback was last logged, reports not logged since).
        self._last: dict[str, tuple[float, int]] = {}

    def report(self, exc: Exception, what: str, now: float) -> None:
        name = type(exc).__name__
        counter = f"stack.error.{name}"
        self._counters[counter] = self._counters.get(counter, 0) + 1
        last = self._last.get(name)
        if last is not None and now - last[0] < self.interval:
            self._last[name] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last[name] = (now, 0)
        log.error("internal error (%s: %s) %s; dropped it and carried on%s", name, exc, what,
                  f" ({suppressed} more not logged since the last report)"
                  if suppressed else "", exc_info=exc)


class Stack:
    """All protocol engines for one guest link. Sans-I/O: see pyslirp.stack."""

    def __init__(self, config: NetConfig, sink: FrameSink, host: HostPort) -> None:
        self.config = config
        self.link = Link(config, sink)
        self.timers = Timers()
        self.host = host
        self._gateway = config.gateway
        self._dns = config.dns
        #: The MAC our ARP answers give the DNS address: libslirp's (52:55 and the address).
        self._dns_mac = config.our_mac[:2] + config.dns
        self._network_int = int(config.network.network_address)
        self._netmask_int = int(config.network.netmask)
        self._broadcast = config.broadcast
        self._gateway6 = config.gateway6
        self._dns6 = config.dns6
        self._link_local6 = config.link_local6
        self._prefix6 = config.network6.network_address.packed[:8]
        #: The guest's IPv4 address as last seen in its frames.
        self.guest_ip: bytes | None = None
        self.dns = DnsForwarder(config, self.link, host, self.timers)
        self.dhcp = DhcpServer(config, self.link)
        self.tcp = TcpEngine(config, self.link, host, self.timers, self.host_targets)
        self.udp = UdpEngine(config, self.link, host, self.timers, self.host_targets)
        self.udp.batching = True  # flush() sends what a batch of frames held back
        self.icmp = IcmpEngine(config, self.link, host, self.timers, self.host_targets)
        self.frag = Reassembler(self.link, self.timers)
        self._vnet = config.vnet_hdr
        self.errors = ErrorReporter(self.link.counters)
        self.ndp: NdpEngine | None = None
        self.frag6: Reassembler | None = None
        self.dhcpv6: Dhcpv6Server | None = None
        #: IPv6 destinations we accept (see the module doc); empty without IPv6.
        self._listening6: frozenset[bytes] = frozenset()
        if config.enable_ipv6:
            self.ndp = NdpEngine(config, self.link, self.timers)
            self.dhcpv6 = Dhcpv6Server(config, self.link)
            self.frag6 = Reassembler(self.link, self.timers, family=IPV6)
            ours = self.ndp.our_addrs
            self._listening6 = ours | {ipv6.solicited_node(a) for a in ours} | {
                ipv6.ALL_NODES, ipv6.ALL_ROUTERS, ipv6.ALL_DHCP_AGENTS}

    # ---- address policy -------------------------------------------------------
    def in_network(self, addr: bytes) -> bool:
        return int.from_bytes(addr, "big") & self._netmask_int == self._network_int

    def set_dns_upstreams(self, upstreams: Iterable[tuple[str, int]]) -> None:
        """Where DNS queries go from now on (queries in flight keep theirs)."""
        self.dns.upstreams = list(upstreams)

    def host_targets(self, dst_ip: bytes, dst_port: int) -> list[tuple[str, int]] | None:
        """Where a guest's connection to ``dst_ip:dst_port`` goes on the host (None: nowhere).

        ``dst_ip`` is 4 bytes (IPv4) or 16 (IPv6, see the module doc)."""
        if len(dst_ip) == 16:
            return self._host_targets6(dst_ip, dst_port)
        if dst_ip == self._gateway:
            if self.config.disable_host_loopback:
                return None
            return [(_LOOPBACK, dst_port)]
        if dst_ip == self._dns:
            if self.config.disable_dns:  # not ours then: an outside address, as in libslirp
                return [(".".join(map(str, dst_ip)), dst_port)]
            if dst_port != _DNS_PORT:
                return None
            return list(self.dns.upstreams) or None
        if self.in_network(dst_ip) or dst_ip[0] == 127 or dst_ip[0] >= 224 or dst_ip[0] == 0:
            return None
        return [(".".join(map(str, dst_ip)), dst_port)]

    def _host_targets6(self, dst_ip: bytes, dst_port: int) -> list[tuple[str, int]] | None:
        if dst_ip == self._gateway6 or dst_ip == self._link_local6:
            if self.config.disable_host_loopback:
                return None
            return [(_LOOPBACK6, dst_port)]
        if dst_ip == self._dns6:
            if self.config.disable_dns:
                return [(ipv6.addr_to_str(dst_ip), dst_port)]
            if dst_port != _DNS_PORT:
                return None
            return list(self.dns.upstreams) or None
        if (dst_ip[:8] == self._prefix6 or dst_ip[:12] == _IPV4_MAPPED_PREFIX
                or dst_ip in (_UNSPECIFIED6, _LOOPBACK6_ADDR)
                or ipv6.is_link_local(dst_ip) or ipv6.is_multicast(dst_ip)):
            return None
        return [(ipv6.addr_to_str(dst_ip), dst_port)]

    # ---- frames from the guest --------------------------------------------------
    def receive_frame(self, frame: memoryview, now: float) -> None:
        """Handle one frame from the guest (with its vnet header if the link has one)."""
        try:
            if self._vnet:
                if len(frame) < vnet.HEADER_LEN:
                    raise MalformedPacket("vnet: short frame")
                if frame[1] & _GSO_TYPE == vnet.GSO_UDP_L4:
                    self._receive_udp_segments(frame, now)
                    return
                trusted = bool(frame[0] & _CSUM_TRUSTED)
                frame = frame[vnet.HEADER_LEN:]
            else:
                trusted = False
            tcp = self.tcp
            if tcp.syn_shed_until > now and tcp.shed_syn(frame, trusted, self.guest_ip):
                return  # a SYN flood's frame, refused unparsed (TcpEngine.shed_syn)
            if len(frame) < _ETH_LEN:
                raise MalformedPacket(
                    f"ethernet: frame of {len(frame)} bytes is shorter than {_ETH_LEN}")
            _dst_mac, src_mac, ethertype = _ETH_HEADER.unpack_from(frame)
            if src_mac != self.link.guest_mac and not src_mac[0] & 1:
                self.link.guest_mac = src_mac
            if ethertype == ethernet.ETHERTYPE_IPV4:
                self._receive_ipv4(Ipv4Packet(frame[_ETH_LEN:]), now, trusted, src_mac)
            elif ethertype == ethernet.ETHERTYPE_ARP:
                self._receive_arp(arp.ArpPacket(frame[_ETH_LEN:]))
            elif ethertype == ethernet.ETHERTYPE_IPV6 and self.ndp is not None:
                self._receive_ipv6(ipv6.Ipv6Packet(frame[_ETH_LEN:]), now, trusted, src_mac,
                                   self.ndp)
            else:
                self.link.count("drop.ethertype")
        except MalformedPacket as exc:
            layer = str(exc).split(":", 1)[0]
            self.link.count(f"drop.malformed.{layer}")
        except Exception as exc:  # a bug: see the module doc
            self.errors.report(exc, "while handling a frame from the guest", now)

    def _receive_ipv4(self, ip: Ipv4Packet, now: float, trusted: bool, src_mac: bytes) -> None:
        if ip.flags_frag & _FRAGMENT_BITS:  # ip.is_fragment, a call fewer per frame
            whole = self.frag.add(ip, now)
            if whole is None:
                return
            ip = Ipv4Packet(memoryview(whole))
            trusted = False
        src = ip.src
        if int.from_bytes(src, "big") & self._netmask_int == self._network_int:  # in_network
            self.guest_ip = src
        proto = ip.proto
        if proto == PROTO_TCP:
            self.tcp.handle(ip, now, trusted)
        elif proto == PROTO_UDP:
            self._receive_udp(ip, now, trusted, src_mac)
        elif proto == PROTO_ICMP:
            self.icmp.handle(ip, now, trusted)
        else:
            self.link.count("drop.ip_proto")

    def _receive_udp(self, ip: Ipv4Packet, now: float, trusted: bool, src_mac: bytes) -> None:
        # Peek at the destination port; only DHCP and DNS need the datagram parsed here
        # (the UDP NAT parses and verifies it itself, once).
        dst = ip.dst
        payload = ip.payload
        dport = payload[2] << 8 | payload[3] if len(payload) >= 4 else -1
        broadcast = dst == self._broadcast or dst == b"\xff\xff\xff\xff"
        if dport == _DHCP_SERVER_PORT and (broadcast or dst == self._gateway):
            udp = UdpDatagram(payload, ip.src, dst, verify_checksum=not trusted)
            self.dhcp.handle(src_mac, ip, udp, now)
        elif broadcast:
            self.link.count("drop.udp.broadcast")
        elif dport == _DNS_PORT and dst == self._dns and not self.config.disable_dns:
            udp = UdpDatagram(payload, ip.src, dst, verify_checksum=not trusted)
            self.dns.handle_query(ip, udp, now)
        else:
            self.udp.handle(ip, now, trusted)

    def _receive_udp_segments(self, frame: memoryview, now: float) -> None:
        """A UDP super-frame (vnet GSO_UDP_L4, USO): a guest socket with ``UDP_SEGMENT``
        sent datagrams of ``gso_size`` bytes each (the last may be shorter) that its
        kernel left for us to cut. Only the UDP NAT takes them, and it keeps them
        apart (one datagram each for the host); DHCP, DNS and broadcast never see
        segmented sends from a real client, so such frames are dropped and counted."""
        link = self.link
        gso_size = vnet.unpack(frame)[3]
        if gso_size == 0:
            raise MalformedPacket("vnet: UDP segmentation with gso_size 0")
        eth = ethernet.EthernetFrame(frame[vnet.HEADER_LEN:])
        ethertype = eth.ethertype
        if ethertype == ethernet.ETHERTYPE_IPV4:
            ip = Ipv4Packet(eth.payload)
            dst = ip.dst
            if (ip.proto != PROTO_UDP or dst == self._dns or dst == self._broadcast
                    or ip.payload[2:4] == _DHCP_PORT_BYTES):
                link.count("drop.udp.segmented_local")
                return
            self.udp.handle(ip, now, True, gso_size)
        elif ethertype == ethernet.ETHERTYPE_IPV6 and self.ndp is not None:
            ip6 = ipv6.Ipv6Packet(eth.payload)
            if (ip6.proto != ipv6.PROTO_UDP or ip6.dst == self._dns6
                    or ipv6.is_multicast(ip6.dst)):
                link.count("drop.udp.segmented_local")
                return
            self.ndp.guest_seen(ip6, now)
            self.udp.handle6(ip6, udp6_datagram(ip6, verify_checksum=False), now, gso_size)
        else:
            link.count("drop.ethertype")

    def _receive_ipv6(self, ip: ipv6.Ipv6Packet, now: float, trusted: bool, src_mac: bytes,
                      ndp: NdpEngine) -> None:
        ndp.guest_seen(ip, now)
        proto = ip.proto
        if proto == ipv6.PROTO_TCP:
            self.tcp.handle6(ip, now, trusted)
        elif proto == ipv6.PROTO_UDP:
            self._receive_udp6(ip, now, trusted, src_mac)
        elif proto == ipv6.PROTO_FRAGMENT:
            self._receive_fragment6(ip, now, src_mac, ndp)
        elif ip.dst not in self._listening6:
            if ipv6.is_multicast(ip.dst):
                self.link.count("drop.ipv6.multicast")
            elif proto == ipv6.PROTO_ICMPV6:
                self.icmp.handle6(ip, now, trusted)  # echo relayed to the outside
            else:
                self.link.count("drop.ipv6.not_forwarded")
        elif proto == ipv6.PROTO_ICMPV6:
            ndp.handle(ip, src_mac, now, trusted)
        else:
            self.link.count("drop.ipv6.not_forwarded")

    def _receive_fragment6(self, ip: ipv6.Ipv6Packet, now: float, src_mac: bytes,
                           ndp: NdpEngine) -> None:
        assert self.frag6 is not None  # made with the NDP engine
        whole = self.frag6.add(ip, now)
        if whole is None:
            return
        packet = ipv6.Ipv6Packet(memoryview(whole))
        if packet.proto == ipv6.PROTO_FRAGMENT:
            self.link.count("drop.frag.nested")  # a fragment of a fragment: no honest sender
            return
        self._receive_ipv6(packet, now, False, src_mac, ndp)

    def _receive_udp6(self, ip: ipv6.Ipv6Packet, now: float, trusted: bool,
                      src_mac: bytes) -> None:
        dst = ip.dst
        multicast = dst[0] == 0xFF
        if multicast and dst not in self._listening6:
            self.link.count("drop.ipv6.multicast")
            return
        udp = udp6_datagram(ip, verify_checksum=not trusted)
        dport = udp.dst_port
        if dport == DHCPV6_SERVER_PORT and dst in self._listening6:
            if self.dhcpv6 is not None:
                self.dhcpv6.handle(ip, udp, src_mac)
        elif multicast:
            self.link.count("drop.ipv6.multicast")
        elif dport == _DNS_PORT and dst == self._dns6 and not self.config.disable_dns:
            self.dns.handle_query(ip, udp, now)
        else:
            self.udp.handle6(ip, udp, now)

    def _receive_arp(self, packet: arp.ArpPacket) -> None:
        if packet.op == arp.OP_REQUEST:
            target = packet.target_ip
            if target == self._gateway or target == self._dns:
                # As libslirp: 10.0.2.3 is at 52:55:0a:00:02:03; what we send comes from our_mac.
                mac = self.link.our_mac if target == self._gateway else self._dns_mac
                reply = arp.build(arp.OP_REPLY, mac, target,
                                  packet.sender_mac, packet.sender_ip)
                self.link.send_ethernet(packet.sender_mac, ethernet.ETHERTYPE_ARP, reply)
        # Replies and requests alike taught us the guest's MAC (in receive_frame).

    def resolve_guest(self, ip: bytes) -> None:
        """Ask (by ARP broadcast) for the MAC of ``ip`` on the guest side."""
        request = arp.build(arp.OP_REQUEST, self.link.our_mac, self._gateway, bytes(6), ip)
        self.link.send_ethernet(ethernet.BROADCAST, ethernet.ETHERTYPE_ARP, request)

    # ---- the runtime's other calls ------------------------------------------------
    def review_floods(self, now: float) -> bool:
        """Review the engines' flood filters (``UdpEngine.review_flood``,
        ``TcpEngine.review_flood``); True if either changed. The runtime calls this
        while the guest floods, for a device that can drop frames unread."""
        changed = self.udp.review_flood(now)
        return self.tcp.review_flood(now, self.guest_ip) or changed

    def flush(self, now: float) -> None:
        """End of a batch of frames: send what engines held back to coalesce."""
        if self.udp.pending is not None:
            self.udp.send_pending()
        self.tcp.flush(now)

    def run_timers(self, now: float) -> None:
        self.timers.run(now)

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    def close_all(self, now: float) -> None:
        """Shut every flow down (RST to the guest for TCP), e.g. on SIGTERM."""
        self.tcp.close_all(now)
        self.udp.close_all()
        self.icmp.close_all()
        self.dns.close_all()
        self.frag.clear()
        if self.frag6 is not None:
            self.frag6.clear()

    @property
    def counters(self) -> dict[str, int]:
        return dict(self.link.counters)

