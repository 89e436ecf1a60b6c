"""The DHCP server of the virtual network (RFC 2131, options RFC 2132 and RFC 3397).

Theory of operation
-------------------
The guest side of the link is a private segment with one authoritative
server: us, at the gateway address. Addresses come from a pool of
``config.dhcp_pool_size`` addresses starting at ``config.dhcp_start``
(10.0.2.15 by default), skipping the gateway, DNS, network and broadcast
addresses should the pool overlap them. A lease is keyed by the client's
hardware address (``chaddr``), as libslirp does; option 61 is accepted and
ignored for identity, since on a TAP link the MAC is what identifies a guest.

Allocation (RFC 2131 4.3.1), in order of preference: the address this client
holds or held before (bound, offered or expired, while nobody else took it);
the address it asks for (option 50, or ``ciaddr``) if it is in the pool and
free; the first address never leased; the address whose lease expired
longest ago. A DISCOVER with nothing left is dropped and counted
(``dhcp.pool_exhausted``): the client retries later, as RFC 2131 4.3.1 allows.
An OFFER reserves its address for :data:`OFFER_HOLD` seconds.

REQUEST is handled per the client state RFC 2131 4.3.2 describes:

* SELECTING (option 54 present): another server's id means the client chose
  someone else; our offer is released and nothing is sent. Otherwise the
  requested address must be the one we can give this client: ACK, else NAK.
* INIT-REBOOT (option 50, no ``ciaddr``) and RENEWING/REBINDING (``ciaddr``,
  no option 50): because we are the only server on this segment we are
  authoritative. An address in the pool and free (or already this client's)
  is ACKed, so a guest keeps its address across our restarts; anything else
  (outside the pool, leased to another MAC, declined) is NAKed.

DECLINE marks the address unusable for :data:`DECLINE_HOLD` seconds (the
guest found it in use, RFC 2131 4.3.3); it is honoured only from the client
the address is offered or leased to (``dhcp.drop.decline_not_holder``
otherwise), so that no other MAC can take a guest's address away. RELEASE expires the lease at once,
while remembering the client, so the address goes to others only when the
never-used ones are gone. INFORM gets an ACK with the configuration options
and no lease (RFC 2131 4.3.5).

Options sent with OFFER/ACK: subnet mask (1), router (3), DNS (6, omitted
with ``config.disable_dns``), domain name (15) and domain search (119) from
``config.search_domains`` (a name that cannot be served is left out with a
warning, see :func:`~pyslirp.stack.config.valid_search_domains`), interface
MTU (26), broadcast address (28), lease time (51), T1 (58) = 1/2 and T2 (59)
= 7/8 of the lease (RFC 2131 4.4.5), server identifier (54). They are all
sent whether or not the client asked (RFC 2131 4.3.1 allows it; both busybox
udhcpc and ISC dhclient accept them), except that the domain search list is
left out when the reply would exceed the client's maximum message size
(option 57, default 576) or the link's MTU.
The client identifier (option 61) is echoed (RFC 6842) when it fits one
option (255 bytes); a longer one, which only a long option (RFC 3396) can
carry, is not echoed (``dhcp.client_id_not_echoed``), so that no client can
make a reply of the size it likes. A reply too big for the link anyway (an
MTU below what DHCP needs) is dropped by the link (``drop.tx.over_mtu``).

Replies are addressed as RFC 2131 4.1 says: to ``giaddr`` (port 67) for a
relayed message; to ``ciaddr`` when the client has one (RENEWING, INFORM);
NAKs and replies to clients setting the broadcast flag go to
255.255.255.255 / ff:ff:ff:ff:ff:ff; otherwise unicast to ``yiaddr`` and
``chaddr``, which both udhcpc and dhclient (packet sockets) receive.

Not done: static leases, persistent lease storage, relay agent information,
plain BOOTP (no option 53), DHCPv6, rapid commit, lease query.
Every malformed or unexpected message is dropped and counted on the link's
counters (``dhcp.*``); :meth:`DhcpServer.handle` never raises.
"""

from __future__ import annotations

import ipaddress
import struct

from pyslirp.stack.config import NetConfig, valid_search_domains
from pyslirp.stack.link import Link
from pyslirp.wire import dhcp
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ethernet import BROADCAST as BROADCAST_MAC
from pyslirp.wire.ipv4 import MIN_HEADER_LEN, Ipv4Packet
from pyslirp.wire.udp import HEADER_LEN as UDP_HEADER_LEN
from pyslirp.wire.udp import PROTO as UDP_PROTO
from pyslirp.wire.udp import UdpDatagram
from pyslirp.wire.udp import build as build_udp

#: How long an OFFER reserves its address for the client (seconds).
OFFER_HOLD = 60.0
#: How long a DECLINEd address stays out of the pool (seconds).
DECLINE_HOLD = 600.0

_ZERO = bytes(4)
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_IP_UDP_LEN = MIN_HEADER_LEN + UDP_HEADER_LEN


class Lease:
    """One client's address. ``expiry`` is absolute; a lease past it is free for others."""

    __slots__ = ("mac", "addr", "expiry", "bound")

    def __init__(self, mac: bytes, addr: bytes, expiry: float, bound: bool) -> None:
        self.mac = mac
        self.addr = addr
        self.expiry = expiry
        #: False while only offered (a REQUEST has not confirmed it yet).
        self.bound = bound

    def __repr__(self) -> str:
        state = "bound" if self.bound else "offered"
        return f"Lease({self.mac.hex(':')}, {ipaddress.IPv4Address(self.addr)}, {state})"


class DhcpServer:
    """Serves DHCP to the guest; the stack hands it every UDP datagram to port 67."""

    def __init__(self, config: NetConfig, link: Link) -> None:
        self.config = config
        self.link = link
        self.server_id = config.gateway
        reserved = {config.gateway, config.dns, config.network.network_address.packed,
                    config.broadcast}
        start = ipaddress.IPv4Address(config.dhcp_start)
        pool: list[bytes] = []
        for i in range(config.dhcp_pool_size):
            addr = start + i
            if addr not in config.network:
                break
            if addr.packed not in reserved:
                pool.append(addr.packed)
        #: Leasable addresses in preference order.
        self.pool: list[bytes] = pool
        self._pool_set = frozenset(pool)
        self._by_mac: dict[bytes, Lease] = {}
        self._by_addr: dict[bytes, Lease] = {}
        #: address -> time until which it stays out of the pool after a DECLINE.
        self._declined: dict[bytes, float] = {}
        # The runtime may change the config after we start (search domains
        # follow resolv.conf), so the encoded options are rebuilt when it does.
        self._options_key: tuple[object, ...] = ()
        self._static_options: list[tuple[int, bytes]] = []
        self._lease_options: list[tuple[int, bytes]] = []
        self._search_option: list[tuple[int, bytes]] = []

    # ---- options --------------------------------------------------------------

    def _refresh_options(self) -> None:
        cfg = self.config
        key = (tuple(cfg.search_domains), cfg.disable_dns, cfg.mtu, cfg.dhcp_lease_seconds)
        if key == self._options_key:
            return
        # Already validated where the list was set; again here, so that a bad name that
        # slipped through costs that name only (it used to cost every option but 53).
        domains = valid_search_domains(cfg.search_domains)
        self._static_options = self._build_static_options(domains)
        self._search_option = self._build_search_option(domains)
        self._options_key = key

    def _build_static_options(self, domains: list[str]) -> list[tuple[int, bytes]]:
        cfg = self.config
        lease = cfg.dhcp_lease_seconds
        opts: list[tuple[int, bytes]] = [
            (dhcp.OPT_SERVER_ID, self.server_id),
            (dhcp.OPT_SUBNET_MASK, cfg.netmask),
            (dhcp.OPT_ROUTER, cfg.gateway),
        ]
        if not cfg.disable_dns:
            opts.append((dhcp.OPT_DNS, cfg.dns))
        opts += [
            (dhcp.OPT_MTU, _U16.pack(cfg.mtu)),
            (dhcp.OPT_BROADCAST, cfg.broadcast),
        ]
        if domains:
            opts.append((dhcp.OPT_DOMAIN_NAME, b".".join(dhcp.domain_labels(domains[0]))))
        self._lease_options = [
            (dhcp.OPT_LEASE_TIME, _U32.pack(lease)),
            (dhcp.OPT_RENEWAL_TIME, _U32.pack(lease // 2)),
            (dhcp.OPT_REBINDING_TIME, _U32.pack(lease * 7 // 8)),
        ]
        return opts

    def _build_search_option(self, domains: list[str]) -> list[tuple[int, bytes]]:
        if not domains:
            return []
        return [(dhcp.OPT_DOMAIN_SEARCH, dhcp.encode_domain_search(domains))]

    # ---- entry point ----------------------------------------------------------

    def handle(self, src_mac: bytes, ip: Ipv4Packet, udp: UdpDatagram, now: float) -> None:
        """Process one datagram sent to port 67; replies go out through the link."""
        try:
            msg = dhcp.DhcpMessage(udp.payload)
        except MalformedPacket:
            self.link.count("dhcp.drop.malformed")
            return
        if msg.op != dhcp.BOOTREQUEST:
            self.link.count("dhcp.drop.not_request")
            return
        if msg.htype != dhcp.HTYPE_ETHERNET or msg.hlen != 6:
            self.link.count("dhcp.drop.not_ethernet")
            return
        kind = msg.msg_type
        if kind == dhcp.DISCOVER:
            self._discover(src_mac, msg, now)
        elif kind == dhcp.REQUEST:
            self._request(src_mac, msg, now)
        elif kind == dhcp.RELEASE:
            self._release(msg, now)
        elif kind == dhcp.DECLINE:
            self._decline(msg, now)
        elif kind == dhcp.INFORM:
            self._inform(src_mac, msg)
        else:
            self.link.count("dhcp.drop.bad_type")

    # ---- lease table ----------------------------------------------------------

    def leases(self) -> list[Lease]:
        """Current leases (bound or offered, including expired ones still remembered)."""
        return list(self._by_mac.values())

    def lease_of(self, mac: bytes, now: float) -> bytes | None:
        """The address bound to ``mac`` now, or None."""
        lease = self._by_mac.get(mac)
        if lease is None or not lease.bound or lease.expiry <= now:
            return None
        return lease.addr

    def _usable_for(self, addr: bytes, mac: bytes, now: float) -> bool:
        """Whether ``addr`` may be leased to ``mac`` now."""
        if addr not in self._pool_set:
            return False
        if self._declined.get(addr, 0.0) > now:
            return False
        holder = self._by_addr.get(addr)
        return holder is None or holder.mac == mac or holder.expiry <= now

    def _choose(self, mac: bytes, wanted: bytes | None, now: float) -> bytes | None:
        own = self._by_mac.get(mac)
        if own is not None and self._usable_for(own.addr, mac, now):
            return own.addr
        if wanted is not None and self._usable_for(wanted, mac, now):
            return wanted
        expired: Lease | None = None
        for addr in self.pool:
            if self._declined.get(addr, 0.0) > now:
                continue
            holder = self._by_addr.get(addr)
            if holder is None:
                return addr
            if holder.expiry <= now and (expired is None or holder.expiry < expired.expiry):
                expired = holder
        return expired.addr if expired is not None else None

    def _assign(self, mac: bytes, addr: bytes, expiry: float, bound: bool) -> None:
        old = self._by_mac.get(mac)
        if old is not None and self._by_addr.get(old.addr) is old:
            del self._by_addr[old.addr]
        other = self._by_addr.get(addr)
        if other is not None and self._by_mac.get(other.mac) is other:
            del self._by_mac[other.mac]
        lease = Lease(mac, addr, expiry, bound)
        self._by_mac[mac] = lease
        self._by_addr[addr] = lease
        self._declined.pop(addr, None)

    def _forget(self, lease: Lease) -> None:
        if self._by_mac.get(lease.mac) is lease:
            del self._by_mac[lease.mac]
        if self._by_addr.get(lease.addr) is lease:
            del self._by_addr[lease.addr]

    # ---- message handlers -----------------------------------------------------

    def _discover(self, src_mac: bytes, msg: dhcp.DhcpMessage, now: float) -> None:
        mac = msg.chaddr
        addr = self._choose(mac, msg.requested_ip, now)
        if addr is None:
            self.link.count("dhcp.pool_exhausted")
            return
        own = self._by_mac.get(mac)
        if own is not None and own.addr == addr and own.bound and own.expiry > now:
            # A bound client restarting from INIT keeps its lease untouched.
            pass
        else:
            self._assign(mac, addr, now + OFFER_HOLD, bound=False)
        self.link.count("dhcp.offer")
        self._reply(src_mac, msg, dhcp.OFFER, addr, lease=True)

    def _request(self, src_mac: bytes, msg: dhcp.DhcpMessage, now: float) -> None:
        mac = msg.chaddr
        server_id = msg.server_id
        if server_id is not None and server_id != self.server_id:
            # SELECTING, and the client chose another server: free our offer.
            own = self._by_mac.get(mac)
            if own is not None and not own.bound:
                self._forget(own)
            self.link.count("dhcp.request_for_other_server")
            return
        wanted = msg.requested_ip or (msg.ciaddr if msg.ciaddr != _ZERO else None)
        if wanted is None:
            self.link.count("dhcp.drop.request_without_address")
            return
        if not self._usable_for(wanted, mac, now):
            self.link.count("dhcp.nak")
            self._nak(src_mac, msg)
            return
        self._assign(mac, wanted, now + self.config.dhcp_lease_seconds, bound=True)
        self.link.count("dhcp.ack")
        self._reply(src_mac, msg, dhcp.ACK, wanted, lease=True)

    def _release(self, msg: dhcp.DhcpMessage, now: float) -> None:
        lease = self._by_mac.get(msg.chaddr)
        if lease is None or lease.addr != msg.ciaddr:
            self.link.count("dhcp.drop.release_unknown")
            return
        # Keep the record so the client gets the same address back if nobody
        # else needed it meanwhile; others may take it from now on.
        lease.expiry = now
        lease.bound = False
        self.link.count("dhcp.release")

    def _decline(self, msg: dhcp.DhcpMessage, now: float) -> None:
        addr = msg.requested_ip
        if addr is None or msg.server_id not in (None, self.server_id):
            self.link.count("dhcp.drop.decline_ignored")
            return
        lease = self._by_addr.get(addr)
        if lease is None or lease.mac != msg.chaddr:
            # Only the client we gave the address to can have found it in use; from
            # anyone else a DECLINE would take a guest's address away at its renewal.
            self.link.count("dhcp.drop.decline_not_holder")
            return
        self._forget(lease)
        if addr in self._pool_set:
            self._declined[addr] = now + DECLINE_HOLD
        self.link.count("dhcp.decline")

    def _inform(self, src_mac: bytes, msg: dhcp.DhcpMessage) -> None:
        if msg.ciaddr == _ZERO:
            self.link.count("dhcp.drop.inform_without_ciaddr")
            return
        self.link.count("dhcp.inform")
        self._reply(src_mac, msg, dhcp.ACK, _ZERO, lease=False)

    # ---- replies --------------------------------------------------------------

    def _reply(self, src_mac: bytes, msg: dhcp.DhcpMessage, kind: int, yiaddr: bytes,
               lease: bool) -> None:
        self._refresh_options()
        options: list[tuple[int, bytes]] = [(dhcp.OPT_MESSAGE_TYPE, bytes((kind,)))]
        options += self._static_options
        if lease:
            options += self._lease_options
        options += self._echoed_client_id(msg)
        payload = dhcp.build(dhcp.BOOTREPLY, msg.xid, msg.chaddr, options + self._search_option,
                             flags=msg.flags, ciaddr=msg.ciaddr, yiaddr=yiaddr,
                             giaddr=msg.giaddr)
        limit = min(msg.max_message_size, self.link.mtu - _IP_UDP_LEN)
        if self._search_option and len(payload) > limit:
            self.link.count("dhcp.search_list_omitted")
            payload = dhcp.build(dhcp.BOOTREPLY, msg.xid, msg.chaddr, options,
                                 flags=msg.flags, ciaddr=msg.ciaddr, yiaddr=yiaddr,
                                 giaddr=msg.giaddr)
        self._send(src_mac, msg, payload, yiaddr, nak=False)

    def _nak(self, src_mac: bytes, msg: dhcp.DhcpMessage) -> None:
        options = [
            (dhcp.OPT_MESSAGE_TYPE, bytes((dhcp.NAK,))),
            (dhcp.OPT_SERVER_ID, self.server_id),
            (dhcp.OPT_MESSAGE, b"requested address not available"),
        ]
        options += self._echoed_client_id(msg)
        payload = dhcp.build(dhcp.BOOTREPLY, msg.xid, msg.chaddr, options, flags=msg.flags,
                             giaddr=msg.giaddr)
        self._send(src_mac, msg, payload, _ZERO, nak=True)

    def _echoed_client_id(self, msg: dhcp.DhcpMessage) -> list[tuple[int, bytes]]:
        """Option 61 to echo (RFC 6842: clients may match replies on it), if any."""
        client_id = msg.client_id
        if client_id is None:
            return []
        if len(client_id) > dhcp.MAX_OPTION_LEN:
            # Only possible as a long option (RFC 3396) that no real client sends; echoed,
            # it would let the client size our reply (up to a frame past the MTU).
            self.link.count("dhcp.client_id_not_echoed")
            return []
        return [(dhcp.OPT_CLIENT_ID, client_id)]

    def _send(self, src_mac: bytes, msg: dhcp.DhcpMessage, payload: bytearray, yiaddr: bytes,
              nak: bool) -> None:
        src = self.server_id
        port = dhcp.CLIENT_PORT
        mac: bytes = msg.chaddr
        # RFC 2131 4.1, "If the 'giaddr' field ... is nonzero ..." onwards.
        if msg.giaddr != _ZERO:
            # The relay is the frame's sender, not the client.
            dst, port, mac = msg.giaddr, dhcp.SERVER_PORT, src_mac
        elif msg.ciaddr != _ZERO and not nak:
            dst = msg.ciaddr
        elif nak or msg.broadcast or yiaddr == _ZERO:
            dst, mac = _LIMITED_BROADCAST, BROADCAST_MAC
        else:
            dst = yiaddr
        self.link.send_ipv4(src, dst, UDP_PROTO,
                            build_udp(src, dhcp.SERVER_PORT, dst, port, payload), dst_mac=mac)
