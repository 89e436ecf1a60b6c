"""DNS wire format: header, question names with compression, error replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dns import DNS, DNSQR, DNSRR

from pyslirp.wire import dns
from pyslirp.wire.errors import MalformedPacket

# dig example.com A +edns: ID 0x1a2b, RD, AD; one question, one OPT record.
QUERY = bytes.fromhex(
    "1a2b01200001000000000001"
    "076578616d706c6503636f6d0000010001"
    "0000291000000000000000")


def test_header_and_question() -> None:
    msg = dns.DnsMessage(QUERY)
    assert (msg.id, msg.qdcount, msg.ancount, msg.nscount, msg.arcount) == (0x1A2B, 1, 0, 0, 1)
    assert not msg.is_response and msg.opcode == 0 and msg.rcode == 0
    q = msg.question()
    assert q is not None
    assert (q.name, q.qtype, q.qclass, q.end) == ("example.com", 1, 1, 29)


def test_question_matches_scapy() -> None:
    raw = bytes(DNS(id=5, rd=1, qd=DNSQR(qname="WwW.Example.ORG.", qtype="AAAA")))
    q = dns.DnsMessage(raw).question()
    assert q is not None
    assert (q.name, q.qtype) == ("WwW.Example.ORG", 28)
    assert q.key() == ("www.example.org", 28, 1)


def test_root_and_escaped_labels() -> None:
    assert dns.read_name(b"\x00", 0) == (".", 1)
    assert dns.read_name(b"\x03a.b\x01\x01\x00", 0) == ("a\\046b.\\001", 7)


def test_compressed_names_in_a_response() -> None:
    # example.com A response; the answer's owner name is a pointer to the question.
    raw = bytes.fromhex("000181800001000100000000" "076578616d706c6503636f6d0000010001"
                        "c00c000100010000012c0004c0000201")
    assert dns.read_name(raw, 29) == ("example.com", 31)
    assert dns.DnsMessage(raw).rcode == 0
    assert DNS(raw).an[0].rdata == "192.0.2.1"  # the fixture is what we think it is
    # a label followed by a pointer
    assert dns.read_name(raw + b"\x03www\xc0\x0c", len(raw)) == ("www.example.com",
                                                                  len(raw) + 6)


@pytest.mark.parametrize("name, reason", [
    (b"\xc0\x0c" + bytes(40), "loop"),               # points at itself
    (b"\x01a\xc0\x0c" + bytes(40), "loop"),           # points back into its own start
    (b"\xc0\x20" + bytes(40), "loop"),               # forward reference
    (b"\xc0", "truncated compression pointer"),
    (b"\x05ab", "past the end"),
    (b"\x01a", "past the end"),
    (b"\x40abc\x00", "reserved label type"),
    (b"\x80abc\x00", "reserved label type"),
    ((b"\x3f" + b"a" * 63) * 4 + b"\x00", "longer than 255"),
])
def test_bad_names(name: bytes, reason: str) -> None:
    buf = QUERY[:12] + name
    with pytest.raises(MalformedPacket, match=reason):
        dns.read_name(buf, 12)


def test_pointer_chain_going_backwards_is_fine_but_cycle_is_not() -> None:
    # offset 0: "a" root ; offset 3: "b" -> 0 ; offset 7: pointer -> 3
    buf = b"\x01a\x00\x01b\xc0\x00\xc0\x03"
    assert dns.read_name(buf, 7) == ("b.a", 9)
    cyclic = b"\xc0\x02\xc0\x00"  # 2 -> 0 -> 2 ...
    with pytest.raises(MalformedPacket):
        dns.read_name(cyclic, 2)


def test_short_header() -> None:
    with pytest.raises(MalformedPacket):
        dns.DnsMessage(b"\x00" * 11)


def test_servfail_reply_bytes() -> None:
    reply = dns.build_error_reply(QUERY, dns.RCODE_SERVFAIL)
    # QR, RD kept, RA, rcode 2; question copied; no OPT.
    assert reply == bytes.fromhex("1a2b81820001000000000000"
                                  "076578616d706c6503636f6d0000010001")
    parsed = DNS(reply)
    assert parsed.qr == 1 and parsed.rcode == 2 and parsed.qd[0].qname == b"example.com."


def test_formerr_with_unreadable_question_is_header_only() -> None:
    bad = QUERY[:12] + b"\xc0\x0c"
    assert dns.build_error_reply(bad, dns.RCODE_FORMERR) == bytes.fromhex(
        "1a2b81810000000000000000")
    with pytest.raises(MalformedPacket):
        dns.build_error_reply(b"\x00\x01", dns.RCODE_FORMERR)


def test_truncated_keeps_question_and_sets_tc() -> None:
    big = bytes(DNS(id=9, qr=1, rd=1, ra=1, qd=DNSQR(qname="big.example"),
                    an=[DNSRR(rrname="big.example", type="TXT", rdata="x" * 200)] * 10))
    out = dns.build_truncated(big)
    msg = dns.DnsMessage(out)
    assert msg.truncated and msg.is_response and msg.id == 9
    assert (msg.qdcount, msg.ancount, msg.arcount) == (1, 0, 0)
    q = msg.question()
    assert q is not None and q.name == "big.example" and q.end == len(out)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    try:
        msg = dns.DnsMessage(data)
        msg.question()
    except MalformedPacket:
        pass
