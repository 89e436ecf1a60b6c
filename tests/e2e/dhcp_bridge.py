"""Test-only: serve DHCP with pyslirp's DhcpServer on a raw AF_PACKET socket.

``python -m tests.e2e.dhcp_bridge IFNAME [--search DOMAIN ...] [--lease SECONDS]`` run inside a
test's own namespace binds a packet socket to IFNAME (one end of a veth whose
other end is in the client's namespace), feeds every IPv4/UDP frame to port
67 into a :class:`~pyslirp.stack.dhcp.DhcpServer`, and writes the frames the
server sends back to the same socket. For every message in and out it prints
one line ``in|out TYPE`` (TYPE: the DHCP message type number), after a first
``ready`` line. It runs until killed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Sequence

from pyslirp.stack.config import NetConfig
from pyslirp.stack.dhcp import DhcpServer
from pyslirp.stack.link import Link
from pyslirp.wire import dhcp
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ethernet import ETHERTYPE_IPV4, EthernetFrame
from pyslirp.wire.ipv4 import PROTO_UDP, Ipv4Packet
from pyslirp.wire.udp import UdpDatagram

ETH_P_ALL = 0x0003


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ifname")
    parser.add_argument("--search", action="append", default=[])
    parser.add_argument("--lease", type=int, default=86400)
    args = parser.parse_args(argv)

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((args.ifname, 0))

    def sink(parts: Sequence[bytes | bytearray | memoryview]) -> None:
        frame = b"".join(bytes(p) for p in parts)
        sock.send(frame)
        msg = dhcp.DhcpMessage(memoryview(frame)[14 + 20 + 8:])
        print("out", msg.msg_type, flush=True)

    config = NetConfig(vnet_hdr=False, search_domains=args.search,
                       dhcp_lease_seconds=args.lease)
    server = DhcpServer(config, Link(config, sink))
    print("ready", flush=True)
    while True:
        frame = sock.recv(65536)
        try:
            eth = EthernetFrame(memoryview(frame))
            if eth.ethertype != ETHERTYPE_IPV4:
                continue
            ip = Ipv4Packet(eth.payload)
            if ip.proto != PROTO_UDP:
                continue
            udp = UdpDatagram(ip.payload)
        except MalformedPacket:
            continue
        if udp.dst_port != dhcp.SERVER_PORT:
            continue
        try:
            print("in", dhcp.DhcpMessage(udp.payload).msg_type, flush=True)
        except MalformedPacket:
            print("in malformed", flush=True)
        server.handle(eth.src, ip, udp, time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
