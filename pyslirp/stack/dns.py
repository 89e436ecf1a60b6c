"""The DNS forwarder behind the virtual DNS address (10.0.2.3:53, UDP).

Theory of operation
-------------------
The guest's UDP queries to ``config.dns`` port 53 arrive in
:meth:`DnsForwarder.handle_query`. A query is checked just enough to be
forwarded safely (a readable header, not a response, opcode QUERY, exactly
one readable question) and then sent, byte for byte, to the upstream
resolvers in the order of :attr:`DnsForwarder.upstreams`, one at a time:

* each attempt gets :attr:`DnsForwarder.attempt_timeout` seconds (on the
  shared Timers heap; the :class:`DnsQuery` is the timer client);
* the next upstream is tried when the attempt times out, when the runtime
  reports the send failed (``upstream_failed``: e.g. ICMP port unreachable on
  the connected socket), or when the upstream answers SERVFAIL or REFUSED
  (that resolver cannot help; another may);
* any other answer (NOERROR, NXDOMAIN, a truncated answer, ...) goes to the
  guest at once, and the query is finished;
* when every upstream has been tried the guest gets the last SERVFAIL/REFUSED
  answer received, or else a SERVFAIL made here: the guest is never left
  without an answer to a well-formed query.

The list of upstreams is copied into each query when it starts, so that the
runtime may replace :attr:`DnsForwarder.upstreams` (after re-reading
resolv.conf) at any time. Replies are matched to their query by the runtime
(a fresh socket per query) and checked here again: the DNS ID, the QR bit
and the question must match, so a stray or spoofed datagram is dropped and
counted, and waiting continues (RFC 5452 9.1). A late answer from an
upstream that already timed out is accepted: it is as good as any other.

The number of queries in flight is bounded (:attr:`DnsForwarder.max_pending`);
beyond it new queries are dropped and counted, and the guest's resolver
retries. A retransmission of a query already in flight (same guest address,
port and ID) is dropped too: the forwarder is already working on it.

Malformed input: a datagram without a readable header is dropped and counted;
a query whose question cannot be parsed, or that does not have exactly one
question, gets FORMERR (RFC 1035 4.1.1); another opcode gets NOTIMP. A reply
too big for the link's MTU is replaced by its truncated form (TC set), so the
guest retries over TCP, which the TCP NAT forwards to the same upstreams.

Not done here: caching, DNSSEC, EDNS processing (OPT records pass through
untouched), DNS over TCP (see the TCP NAT), IPv6 upstreams (the runtime
filters them; see :func:`parse_resolv_conf`).

Runtime contract (see ``stack/host.py``): ``host.dns_send(query, upstream,
data)`` for each attempt; the runtime answers with
``forwarder.upstream_reply(query, data, now)`` or
``forwarder.upstream_failed(query, now)``, passing ``upstream=`` when it
knows which attempt the event belongs to (so a late failure from an earlier
upstream does not cut the current attempt short). ``host.dns_cancel(query)``
is called exactly once when a query finishes; the runtime then releases the
query's sockets and delivers nothing more for it.
"""

from __future__ import annotations

import ipaddress

from pyslirp.stack.config import NetConfig
from pyslirp.stack.host import HostPort
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import dns
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ipv4 import MIN_HEADER_LEN as IPV4_HEADER_LEN
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.udp import HEADER_LEN as UDP_HEADER_LEN
from pyslirp.wire.udp import PROTO as UDP_PROTO
from pyslirp.wire.udp import UdpDatagram
from pyslirp.wire.udp import build as build_udp

#: Seconds each upstream gets to answer before the next is tried.
DEFAULT_ATTEMPT_TIMEOUT = 2.0
#: Queries in flight at most; more are dropped (the guest retries).
DEFAULT_MAX_PENDING = 512

Buffer = bytes | bytearray | memoryview


class DnsQuery:
    """One guest query in flight; also the timer client for its attempt timeout.

    The runtime may read ``guest_ip``, ``guest_port``, ``query_id``,
    ``attempt``, ``upstream`` and ``data``; it may attach its own state in
    ``runtime_state``.
    """

    __slots__ = ("forwarder", "guest_ip", "guest_port", "query_id", "question", "data",
                 "upstreams", "attempt", "last_reply", "timer_deadline", "done",
                 "runtime_state")

    def __init__(self, forwarder: DnsForwarder, guest_ip: bytes, guest_port: int,
                 query_id: int, question: dns.Question, data: bytes,
                 upstreams: tuple[tuple[str, int], ...]) -> None:
        self.forwarder = forwarder
        self.guest_ip = guest_ip
        self.guest_port = guest_port
        self.query_id = query_id
        self.question = question
        #: The query exactly as the guest sent it (what goes upstream).
        self.data = data
        self.upstreams = upstreams
        #: Index into ``upstreams`` of the attempt in progress.
        self.attempt = 0
        #: The last SERVFAIL/REFUSED answer, sent to the guest if nothing better comes.
        self.last_reply: bytes | None = None
        self.timer_deadline: float | None = None
        self.done = False
        self.runtime_state: object = None

    @property
    def key(self) -> tuple[bytes, int, int]:
        return self.guest_ip, self.guest_port, self.query_id

    @property
    def upstream(self) -> tuple[str, int]:
        return self.upstreams[self.attempt]

    def on_timer(self, now: float) -> None:
        self.forwarder._attempt_timed_out(self, now)

    def __repr__(self) -> str:
        return (f"DnsQuery({ipaddress.IPv4Address(self.guest_ip)}:{self.guest_port} "
                f"id={self.query_id} {self.question!r} attempt={self.attempt})")


class DnsForwarder:
    def __init__(self, config: NetConfig, link: Link, host: HostPort, timers: Timers) -> None:
        self.config = config
        self.link = link
        self.host = host
        self.timers = timers
        #: Where queries go, in order; set by the runtime (config or resolv.conf).
        self.upstreams: list[tuple[str, int]] = list(config.dns_upstreams)
        self.attempt_timeout = DEFAULT_ATTEMPT_TIMEOUT
        self.max_pending = DEFAULT_MAX_PENDING
        self.pending: dict[tuple[bytes, int, int], DnsQuery] = {}
        # Largest UDP payload that fits the link without IP fragmentation.
        self._max_payload = config.mtu - IPV4_HEADER_LEN - UDP_HEADER_LEN

    # ---- from the guest -------------------------------------------------------

    def handle_query(self, ip: Ipv4Packet, udp: UdpDatagram, now: float) -> None:
        """A UDP datagram from the guest to the DNS address, port 53."""
        data = udp.payload
        try:
            msg = dns.DnsMessage(data)
        except MalformedPacket:
            self.link.count("dns.drop.malformed")
            return
        if msg.is_response:
            self.link.count("dns.drop.not_query")
            return
        if msg.opcode != dns.OPCODE_QUERY:
            self.link.count("dns.notimp")
            self._answer(ip.src, udp.src_port, dns.build_error_reply(data, dns.RCODE_NOTIMP))
            return
        try:
            question = msg.question() if msg.qdcount == 1 else None
        except MalformedPacket:
            question = None
        if question is None:
            self.link.count("dns.formerr")
            self._answer(ip.src, udp.src_port, dns.build_error_reply(data, dns.RCODE_FORMERR))
            return
        key = (ip.src, udp.src_port, msg.id)
        if key in self.pending:
            self.link.count("dns.drop.retransmit")
            return
        if not self.upstreams:
            self.link.count("dns.no_upstream")
            self._answer(ip.src, udp.src_port, dns.build_error_reply(data, dns.RCODE_SERVFAIL))
            return
        if len(self.pending) >= self.max_pending:
            self.link.count("dns.drop.pending_limit")
            return
        query = DnsQuery(self, ip.src, udp.src_port, msg.id, question, bytes(data),
                         tuple(self.upstreams))
        self.pending[key] = query
        self.link.count("dns.query")
        self._send_attempt(query, now)

    # ---- from the runtime -----------------------------------------------------

    def upstream_reply(self, query: DnsQuery, data: Buffer, now: float,
                       upstream: tuple[str, int] | None = None) -> None:
        """An answer arrived for ``query`` (from ``upstream``, if the runtime knows)."""
        if query.done:
            self.link.count("dns.drop.late_reply")
            return
        try:
            msg = dns.DnsMessage(data)
            question = msg.question()
        except MalformedPacket:
            self.link.count("dns.drop.bad_reply")
            return
        if (not msg.is_response or msg.id != query.query_id
                or (question is not None and question.key() != query.question.key())):
            self.link.count("dns.drop.mismatched_reply")
            return
        if msg.rcode in (dns.RCODE_SERVFAIL, dns.RCODE_REFUSED):
            query.last_reply = bytes(data)
            self.link.count("dns.upstream_servfail")
            if upstream is None or upstream == query.upstream:
                self._next_attempt(query, now)
            return
        self._finish(query, data)

    def upstream_failed(self, query: DnsQuery, now: float,
                        upstream: tuple[str, int] | None = None) -> None:
        """Sending to or receiving from the upstream failed (e.g. ICMP unreachable)."""
        if query.done:
            return
        self.link.count("dns.upstream_failed")
        if upstream is None or upstream == query.upstream:
            self._next_attempt(query, now)

    def _attempt_timed_out(self, query: DnsQuery, now: float) -> None:
        if query.done:
            return
        self.link.count("dns.upstream_timeout")
        self._next_attempt(query, now)

    # ---- internals ------------------------------------------------------------

    def _send_attempt(self, query: DnsQuery, now: float) -> None:
        self.timers.schedule(query, now + self.attempt_timeout)
        self.host.dns_send(query, query.upstream, query.data)

    def _next_attempt(self, query: DnsQuery, now: float) -> None:
        if query.attempt + 1 < len(query.upstreams):
            query.attempt += 1
            self._send_attempt(query, now)
            return
        self.link.count("dns.all_upstreams_failed")
        reply = query.last_reply
        self._finish(query, reply if reply is not None
                     else dns.build_error_reply(query.data, dns.RCODE_SERVFAIL))

    def _finish(self, query: DnsQuery, reply: Buffer) -> None:
        query.done = True
        self.timers.cancel(query)
        del self.pending[query.key]
        self.host.dns_cancel(query)
        self._answer(query.guest_ip, query.guest_port, reply)

    def _answer(self, guest_ip: bytes, guest_port: int, data: Buffer) -> None:
        if len(data) > self._max_payload:
            self.link.count("dns.truncated_for_mtu")
            data = dns.build_truncated(data)
        src = self.config.dns
        self.link.send_ipv4(src, guest_ip, UDP_PROTO,
                            build_udp(src, dns.PORT, guest_ip, guest_port, data))

    def close_all(self) -> None:
        """Give up every query in flight (shutdown): each guest gets a SERVFAIL."""
        for query in list(self.pending.values()):
            self._finish(query, dns.build_error_reply(query.data, dns.RCODE_SERVFAIL))


def parse_resolv_conf(text: str) -> tuple[list[str], list[str]]:
    """Nameservers and search domains from resolv.conf(5) text.

    Follows glibc: ``#`` or ``;`` starts a comment (at the start of a line,
    and here also after whitespace); ``nameserver`` takes one address;
    ``search`` and ``domain`` both set the search list and the last one wins.
    Invalid addresses are skipped; duplicates are kept once, in order.
    IPv6 nameservers (including link-local ones with a ``%zone``) are kept, as
    text: they are recognisable by containing ``:`` (see :func:`is_ipv6`), so
    the caller can skip them while it has no IPv6 upstream support. Trailing
    dots are removed from search domains, and the root domain is dropped.
    """
    nameservers: list[str] = []
    search: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        words = []
        for word in line.split():
            if word[0] in "#;":
                break
            words.append(word)
        if not words:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver" and args:
            addr = args[0]
            address_part = addr.split("%", 1)[0]
            try:
                ipaddress.ip_address(address_part)
            except ValueError:
                continue
            if addr not in nameservers:
                nameservers.append(addr)
        elif keyword in ("search", "domain"):
            search = []
            for domain in args if keyword == "search" else args[:1]:
                name = domain.rstrip(".")
                if name and name not in search:
                    search.append(name)
    return nameservers, search


def is_ipv6(nameserver: str) -> bool:
    """Whether a nameserver from :func:`parse_resolv_conf` is an IPv6 address."""
    return ":" in nameserver


def ipv4_upstreams(nameservers: list[str], port: int = dns.PORT) -> list[tuple[str, int]]:
    """The IPv4 nameservers as ``(address, port)`` upstreams, in order."""
    return [(ns, port) for ns in nameservers if not is_ipv6(ns)]
