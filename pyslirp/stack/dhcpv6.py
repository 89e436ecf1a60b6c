"""Stateless DHCPv6 server (RFC 8415 section 18.4 with 21.2/21.3; options RFC 3646).

Theory of operation
-------------------
Addresses come from SLAAC (our router advertisements, :mod:`pyslirp.stack.ndp`,
set the "other configuration" flag), so DHCPv6 here only hands out what
SLAAC cannot: the DNS server (option 23, ``config.dns6``) and the search list
(option 24, ``config.search_domains``), both left out with
``config.disable_dns``. Only Information-Request is answered; a Solicit,
Request, Renew or any other message is counted (``dhcpv6.ignored.<type>``)
and dropped, so a stateful client keeps soliciting and gets no address, as
from any stateless server.

An Information-Request is discarded (RFC 8415 16.12) when it carries an IA
option (``dhcpv6.drop.ia_option``) or a Server Identifier that is not our
DUID (``dhcpv6.drop.other_server``). The Reply carries the client's
transaction id, our Server Identifier (a DUID-LL of our MAC, stable across
restarts), the Client Identifier echoed when there is one, and the options
above; it goes from our link-local address, port 547, to the client's source
address and MAC, port 546. A client without a link-local source (the
unspecified address) gets nothing (``dhcpv6.drop.bad_source``): RFC 8415 13.1
has clients use their link-local address.

The UDP checksum is mandatory over IPv6 (RFC 8200 8.1): a datagram with a
zero or wrong one is malformed (``drop.malformed.udp``), unless the vnet
header says the guest's kernel left it to be completed (NEEDS_CSUM, which
ISC dhclient's datagrams arrive with) or already checked it (DATA_VALID).
"""

from __future__ import annotations

import struct

from pyslirp.stack.config import NetConfig
from pyslirp.stack.link import Link
from pyslirp.stack.ndp import search_list, send_ipv6
from pyslirp.wire import dhcpv6, ipv6
from pyslirp.wire.checksum import finish, partial_sum
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv6 import Ipv6Packet
from pyslirp.wire.udp import HEADER_LEN as UDP_HEADER_LEN
from pyslirp.wire.udp import UdpDatagram

_UDP = struct.Struct("!HHHH")
_IA_OPTIONS = (dhcpv6.OPT_IA_NA, dhcpv6.OPT_IA_TA, dhcpv6.OPT_IA_PD)


def udp6_datagram(ip: Ipv6Packet, verify_checksum: bool = True) -> UdpDatagram:
    """The UDP datagram of ``ip``, its (mandatory) IPv6 checksum verified unless the link
    vouched for it (vnet NEEDS_CSUM/DATA_VALID: the field then holds a partial sum)."""
    udp = UdpDatagram(ip.payload)
    if not verify_checksum:
        return udp
    if udp.csum == 0 or partial_sum(
            udp.buf, ipv6.pseudo_header_sum(ip.src, ip.dst, ipv6.PROTO_UDP, udp.length)) != 0:
        raise MalformedPacket("udp: bad or missing checksum over IPv6")
    return udp


def build_udp6(src: bytes, src_port: int, dst: bytes, dst_port: int, payload: bytes) -> bytes:
    length = UDP_HEADER_LEN + len(payload)
    out = bytearray(_UDP.pack(src_port, dst_port, length, 0) + payload)
    csum = finish(partial_sum(out, ipv6.pseudo_header_sum(src, dst, ipv6.PROTO_UDP, length)))
    out[6] = csum >> 8
    out[7] = csum & 0xFF
    return bytes(out)


class Dhcpv6Server:
    """Answers Information-Requests with DNS configuration (see the module doc)."""

    def __init__(self, config: NetConfig, link: Link) -> None:
        self.config = config
        self.link = link
        self.duid = dhcpv6.duid_ll(link.our_mac)
        self.link_local = config.link_local6

    def handle(self, ip: Ipv6Packet, udp: UdpDatagram, src_mac: bytes) -> None:
        msg = dhcpv6.Dhcpv6Message(udp.payload)
        if msg.msg_type != dhcpv6.INFORMATION_REQUEST:
            self.link.count(f"dhcpv6.ignored.{msg.msg_type}")
            return
        if any(msg.has(code) for code in _IA_OPTIONS):
            self.link.count("dhcpv6.drop.ia_option")
            return
        server_id = msg.option(dhcpv6.OPT_SERVERID)
        if server_id is not None and bytes(server_id) != self.duid:
            self.link.count("dhcpv6.drop.other_server")
            return
        if ip.src == ipv6.UNSPECIFIED or ipv6.is_multicast(ip.src):
            self.link.count("dhcpv6.drop.bad_source")
            return
        reply = dhcpv6.build(dhcpv6.REPLY, msg.transaction_id, self._reply_options(msg))
        datagram = build_udp6(self.link_local, dhcpv6.SERVER_PORT, ip.src, udp.src_port, reply)
        send_ipv6(self.link, src_mac, self.link_local, ip.src, ipv6.PROTO_UDP, datagram)
        self.link.count("dhcpv6.reply")

    def _reply_options(self, msg: dhcpv6.Dhcpv6Message) -> list[tuple[int, bytes | memoryview]]:
        options: list[tuple[int, bytes | memoryview]] = [(dhcpv6.OPT_SERVERID, self.duid)]
        client_id = msg.option(dhcpv6.OPT_CLIENTID)
        if client_id is not None:
            options.append((dhcpv6.OPT_CLIENTID, client_id))
        if not self.config.disable_dns:
            options.append((dhcpv6.OPT_DNS_SERVERS, self.config.dns6))
            names = search_list(self.config.search_domains)
            if names:
                options.append((dhcpv6.OPT_DOMAIN_LIST, names))
        return options
