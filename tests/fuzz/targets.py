"""Fuzz targets: one function per wire parser, plus the whole stack.

Theory of operation
-------------------
Each target takes arbitrary ``bytes`` and drives one parser through everything a
caller of it does: the constructor and then every property and method the stack
reads. The contract under test is the wire layer's: bad input raises
:class:`~pyslirp.wire.errors.MalformedPacket` and nothing else, and what a view
accepts is consistent (payload slices inside the buffer, lengths as announced).
:func:`run_target` turns that contract into "returns, or raises a bug": a
``MalformedPacket`` is the expected outcome for garbage, anything else (IndexError,
struct.error, UnicodeError, an AssertionError from a consistency check, ...)
escapes to the fuzzer as a crash.

Used by the bounded runs in tests/fuzz/test_fuzz_*.py (hypothesis) and by the long
runs of ``scripts/fuzz`` (atheris); the stack target lives in
:mod:`tests.fuzz.stackprog`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pyslirp.wire import arp, dhcp, dns, ethernet, icmp, ipv4, tcp, udp, vnet
from pyslirp.wire.errors import MalformedPacket


def fuzz_vnet(data: bytes) -> None:
    header = vnet.VnetHeader(memoryview(data))
    assert vnet.unpack(data)[:6] == (header.flags, header.gso_type, header.hdr_len,
                                     header.gso_size, header.csum_start, header.csum_offset)


def fuzz_ethernet(data: bytes) -> None:
    frame = ethernet.EthernetFrame(memoryview(data))
    assert len(frame.payload) == len(data) - ethernet.HEADER_LEN
    assert len(frame.src) == len(frame.dst) == 6


def fuzz_arp(data: bytes) -> None:
    packet = arp.ArpPacket(memoryview(data))
    assert len(packet.sender_ip) == len(packet.target_ip) == 4
    assert len(packet.sender_mac) == len(packet.target_mac) == 6


def fuzz_ipv4(data: bytes) -> None:
    # Both ways the stack parses: verified (frames from the guest) and trusted.
    for verify in (False, True):
        packet = ipv4.Ipv4Packet(memoryview(data), verify_checksum=verify)
        assert 20 <= packet.header_len <= packet.total_len == len(packet.buf) <= len(data)
        assert len(packet.payload) == packet.total_len - packet.header_len
        assert packet.is_fragment == (packet.more_fragments or packet.frag_offset > 0)
        assert packet.frag_offset <= 0x1FFF * 8


def fuzz_icmp(data: bytes) -> None:
    # The stack quotes whatever IP packet it refuses in an ICMP error.
    error = icmp.build_error(icmp.DEST_UNREACH, icmp.PORT_UNREACH, data)
    assert len(error) <= icmp.HEADER_LEN + 60 + 8
    for verify in (False, True):
        message = icmp.IcmpMessage(memoryview(data), verify_checksum=verify)
        assert len(message.payload) == len(data) - icmp.HEADER_LEN


def _addresses(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Inputs of the UDP and TCP targets start with the pseudo-header's two addresses."""
    return data[0:4].ljust(4, b"\0"), data[4:8].ljust(4, b"\0"), data[8:]


def fuzz_udp(data: bytes) -> None:
    src, dst, data = _addresses(data)
    for verify in (False, True):
        datagram = udp.UdpDatagram(memoryview(data), src, dst, verify_checksum=verify)
        assert len(datagram.buf) == datagram.length <= len(data)
        assert len(datagram.payload) == datagram.length - udp.HEADER_LEN


def fuzz_tcp(data: bytes) -> None:
    src, dst, data = _addresses(data)
    # The option parser alone sees more shapes than a header lets through.
    with contextlib.suppress(MalformedPacket):
        tcp.parse_options(data[:tcp.MAX_HEADER_LEN])
    for verify in (False, True):
        segment = tcp.TcpSegment(memoryview(data), src, dst, verify_checksum=verify)
        assert tcp.HEADER_LEN <= segment.header_len <= len(data)
        assert segment.payload_len == len(segment.payload) >= 0
        assert segment.seq_len >= segment.payload_len
        repr(segment)
        options = segment.options()
        repr(options)
        assert options.wscale is None or 0 <= options.wscale <= tcp.MAX_WSCALE
        assert all(0 <= edge <= 0xFFFFFFFF for block in options.sack for edge in block)


def fuzz_dhcp(data: bytes) -> None:
    message = dhcp.DhcpMessage(data)
    assert len(message.chaddr) == message.hlen <= 16
    assert message.msg_type is None or 0 <= message.msg_type <= 255
    for addr in (message.requested_ip, message.server_id):
        assert addr is None or len(addr) == 4
    message.client_id  # noqa: B018 (the properties are the parser's API)
    message.param_request_list  # noqa: B018
    assert message.max_message_size >= dhcp.DEFAULT_MAX_MESSAGE_LEN
    message.broadcast  # noqa: B018
    # What the server echoes back must encode (RFC 3396 splits long values).
    dhcp.encode_options(list(message.options.items()))


def fuzz_dns(data: bytes) -> None:
    # The error builders take any message with a header, readable question or not.
    if len(data) >= dns.HEADER_LEN:
        for rcode in (dns.RCODE_SERVFAIL, dns.RCODE_FORMERR):
            reply = dns.build_error_reply(data, rcode)
            assert dns.DnsMessage(reply).rcode == rcode
        assert dns.DnsMessage(dns.build_truncated(data)).truncated
    message = dns.DnsMessage(data)
    message.is_response, message.opcode, message.rcode  # noqa: B018
    question = message.question()
    if question is not None:
        assert question.end <= len(data)
        assert len(question.name) <= 4 * dns.MAX_NAME_LEN
        question.key()
        repr(question)
    # A name may start anywhere a compression pointer can point.
    for offset in range(dns.HEADER_LEN, min(len(data), dns.HEADER_LEN + 32)):
        try:
            name, end = dns.read_name(data, offset)
        except MalformedPacket:
            continue
        assert offset < end <= len(data)


WIRE_TARGETS: dict[str, Callable[[bytes], None]] = {
    "vnet": fuzz_vnet, "ethernet": fuzz_ethernet, "arp": fuzz_arp, "ipv4": fuzz_ipv4,
    "icmp": fuzz_icmp, "udp": fuzz_udp, "tcp": fuzz_tcp, "dhcp": fuzz_dhcp, "dns": fuzz_dns,
}


def run_target(target: Callable[[bytes], None], data: bytes) -> None:
    """Run ``target`` on ``data``; a MalformedPacket is the expected rejection."""
    with contextlib.suppress(MalformedPacket):
        target(data)
