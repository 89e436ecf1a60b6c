"""The DNS forwarder behind the virtual DNS address (10.0.2.3:53, UDP).

Theory of operation
-------------------
The guest's UDP queries to ``config.dns`` port 53 (or, with IPv6, to
``config.dns6`` port 53: the same forwarder, answered over IPv6) arrive in
:meth:`DnsForwarder.handle_query`. A query is checked just enough to be
forwarded safely (a readable header, not a response, opcode QUERY, exactly
one readable question) and then sent to the upstream resolvers in the order
of :attr:`DnsForwarder.upstreams`, one at a time:

* each attempt gets :attr:`DnsForwarder.attempt_timeout` seconds;
* the next upstream is tried when the attempt times out, when the runtime
  reports that the attempt failed (``upstream_failed``, or ``upstream_error``:
  e.g. ICMP port unreachable), or when the upstream answers SERVFAIL or
  REFUSED (that resolver cannot help; another may);
* any other answer (NOERROR, NXDOMAIN, a truncated answer, ...) goes to the
  guest at once, and the query is finished;
* when every upstream has been tried the guest gets the last SERVFAIL/REFUSED
  answer received, or else a SERVFAIL made here: the guest is never left
  without an answer to a well-formed query.

The list of upstreams is copied into each query when it starts, so that the
runtime may replace :attr:`DnsForwarder.upstreams` (after re-reading
resolv.conf) at any time.

One socket per upstream, IDs rewritten
--------------------------------------
The runtime keeps one long-lived connected UDP socket per upstream and sends
every attempt to that upstream over it (a socket per query cost about six
system calls and two event-loop registrations per query; this is what made
forwarding slower than slirp4netns). Queries from the guest (or from several
guest sockets) may carry the same ID, so each attempt is sent under an ID of
its own: a random 16-bit ID, unique among the attempts pending at that
upstream (:meth:`DnsForwarder._new_id`). The query is otherwise forwarded
byte for byte, and the guest's ID is put back into the answer.

Every datagram from an upstream's socket is handed to
:meth:`DnsForwarder.upstream_datagram` with the upstream it came from, and is
matched to an attempt by that upstream's table of IDs; it must then also be
a response (QR) whose question equals the query's (names compared
case-insensitively, RFC 4343). Anything else is dropped and counted, and
waiting continues (RFC 5452 9.1). A reply without a question section is
accepted only with an error RCODE (FORMERR, SERVFAIL, NOTIMP, REFUSED), which
servers may send that way; an answer needs its question. The common answer
(a response, neither SERVFAIL nor REFUSED, whose question section starts with
the query's bytes as the guest wrote them) is recognised in
:meth:`DnsForwarder.upstream_datagram` itself; anything else (another
spelling of the name, a compressed question, an error) goes the careful way
through the wire parser. A late answer from
an upstream that already timed out is accepted: the attempt's ID stays
registered until the query finishes, and the answer is as good as any other.

An error on an upstream's socket (ICMP port unreachable and the like) fails
the attempt whose datagram caused it when the runtime can tell which (Linux
returns the datagram's start with ``IP_RECVERR``: ``upstream_error`` with its
ID), and otherwise every attempt currently waiting on that upstream.

When an upstream leaves :attr:`DnsForwarder.upstreams` and nothing waits on it
any more, and for every upstream on :meth:`DnsForwarder.close_all`, the
runtime is told (``host.dns_release``) to close its socket.

Security trade-off of a fixed source port. With a socket per query, a forged
answer had to guess the source port as well as the ID. Now the source port
is the same for many queries, so an attacker who can forge datagrams from the
upstream's address (and knows or guesses the port) has only the 16-bit ID and
the question to match, against as many IDs as there are attempts pending at
that upstream. What is done about it cheaply: IDs come from a
cryptographically strong source (the OS's, ``random.SystemRandom``, which is
what ``secrets`` uses without its hashlib/hmac imports; the guest's own ID is never
what the upstream sees), the question must match, the socket is connected
(the kernel drops datagrams from any other address or port), and the
answer's question section may not be missing. Upstreams are normally local
resolvers (loopback or the host's LAN), which off-path attackers cannot
reach with forged loopback addresses. Not done: DNS 0x20 case randomisation
(it would need the guest's spelling restored in the answer, and some
resolvers do not echo case).

The number of queries in flight is bounded (:attr:`DnsForwarder.max_pending`);
beyond it new queries are dropped and counted, and the guest's resolver
retries. A retransmission of a query already in flight (same guest address,
port and ID) is dropped too: the forwarder is already working on it.

Timeouts: every attempt has the same timeout, so deadlines are queued in the
order they are made (a deque, not one heap entry per query) and the forwarder
is a single client of the shared Timers heap, scheduled for the earliest
deadline. Entries of finished queries (and of attempts that gave way to the
next) are stale: they are dropped from the front of the queue as queries
finish and when the timer fires. Behind one unanswered query at the front,
stale entries would pile up (each keeping its finished query alive) until
that query's deadline, without bound under a steady stream of answered
queries; so the queue is rebuilt without them once they are more than half of
it, as :mod:`pyslirp.stack.timers` does for its heap. The queue then holds at
most about twice as many entries as there are queries in flight, which
:attr:`DnsForwarder.max_pending` bounds.

Malformed input: a datagram without a readable header is dropped and counted;
a query whose question cannot be parsed, or that does not have exactly one
question, gets FORMERR (RFC 1035 4.1.1); another opcode gets NOTIMP. A reply
too big for the link's MTU is replaced by its truncated form (TC set), so the
guest retries over TCP, which the TCP NAT forwards to the same upstreams.
From an upstream: a datagram that is unreadable, not a response, under an ID
nothing waits for (a second answer to the same attempt included) or with
another question is dropped and counted, and the attempt goes on waiting (its
timeout then fails it over as usual). Past the question a reply is not
parsed: an answer the upstream truncated (TC set) or cut short in its records
goes to the guest as it came, for the guest's resolver to judge (retry over
TCP, or treat as an error), as any forwarder that does not cache does.

Not done here: caching, DNSSEC, EDNS processing (OPT records pass through
untouched), DNS over TCP (see the TCP NAT), IPv6 upstreams from resolv.conf
(the runtime filters them; see :func:`parse_resolv_conf`).

The answer path allocates per query only what the ID map holds (the
:class:`DnsQuery`, its one copy of the query, whose first two bytes each attempt
rewrites, and the question's bytes) and the reply's header: the reply frame is
the upstream's datagram behind headers copied from a template made for the
last guest answered (IPv4 or IPv6), with the guest's ID in the header part, so
the answer itself is never copied.

Runtime contract (see ``stack/host.py``): ``host.dns_send(query, upstream,
data)`` for each attempt (``data`` carries the attempt's ID, and is the query's
own buffer: valid for the call only, the next attempt rewrites it); the runtime
answers with ``forwarder.upstream_datagram(upstream, data, now)`` for each
datagram read from the upstream's socket, ``forwarder.upstream_error(upstream,
now, wire_id)`` for an error on it, and ``forwarder.upstream_failed(query,
now, upstream)`` when an attempt could not be sent. ``host.dns_cancel(query)``
is called exactly once when a query finishes (the runtime holds nothing per
query, so it may ignore it); ``host.dns_release(upstream)``, if the runtime
has it, when the upstream's socket may be closed.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from array import array
from bisect import insort
from collections import deque
from collections.abc import Callable, Iterable
from operator import itemgetter

from pyslirp.stack.config import NetConfig, valid_search_domains
from pyslirp.stack.host import Buffer, HostPort
from pyslirp.stack.link import Link
from pyslirp.stack.timers import Timers
from pyslirp.wire import dns, ipv4, ipv6, vnet
from pyslirp.wire.checksum import finish, partial_sum, pseudo_header_sum
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6
from pyslirp.wire.frame import ETH_IPV4_UDP, ETH_IPV6_UDP, IPV6_VERSION_WORD, L4_START6
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.ipv6 import Ipv6Packet
from pyslirp.wire.udp import HEADER_LEN as UDP_HEADER_LEN
from pyslirp.wire.udp import PROTO as UDP_PROTO
from pyslirp.wire.udp import UdpDatagram

#: Seconds each upstream gets to answer before the next is tried.
DEFAULT_ATTEMPT_TIMEOUT = 2.0
#: Queries in flight at most; more are dropped (the guest retries).
DEFAULT_MAX_PENDING = 512

Upstream = tuple[str, int]

# ID, flags, QDCOUNT: all the header a forwarder reads.
_HEAD = struct.Struct("!HHH")
#: os.urandom behind random's API (the stack imports no os): secrets.token_bytes is this.
_SYSTEM_RANDOM = random.SystemRandom()
_U16 = struct.Struct("!H")
_QNAME = dns.HEADER_LEN  # where the (first) question's name starts
#: Header flag bits that make a datagram to the DNS address no query we forward.
_NOT_A_QUERY = dns.FLAG_QR | dns.OPCODE_MASK
#: What an upstream's answer has in these bits: QR set, opcode QUERY.
_ANSWER_MASK = dns.FLAG_QR | dns.OPCODE_MASK
#: RCODEs after which the next upstream is tried (that resolver cannot help; another may).
_RCODES_FAIL_OVER = (dns.RCODE_SERVFAIL, dns.RCODE_REFUSED)
#: Error RCODEs a server may send without echoing the question.
_RCODES_WITHOUT_QUESTION = frozenset(
    {dns.RCODE_FORMERR, dns.RCODE_SERVFAIL, dns.RCODE_NOTIMP, dns.RCODE_REFUSED})
#: Random bytes fetched at a time for attempt IDs (two per ID).
_ID_BATCH_BYTES = 512
#: Below this many stale entries the deadline queue is never rebuilt (not worth it).
_EXPIRY_COMPACT_MIN = 64

# A reply frame: Ethernet + IPv4 (20 bytes, no options) + UDP headers, as the UDP
# engine builds them (see stack/udp.py).
_FRAME = ETH_IPV4_UDP
_FRAME_LEN = _FRAME.size
_IP_START = 14
_L4_START = _IP_START + ipv4.MIN_HEADER_LEN
_IP_CSUM = _IP_START + 10
_UDP_CSUM = _L4_START + 6
_IP_UDP_LEN = ipv4.MIN_HEADER_LEN + UDP_HEADER_LEN
_IP_LEN_ID = struct.Struct("!HH")  # total length, identification
_UDP_HEAD = struct.Struct("!HHHH")
# The IPv6 reply frame (40-byte header, no extension headers).
_FRAME6 = ETH_IPV6_UDP
_IP6_PAYLOAD_LEN = _IP_START + 4
_IP6_UDP_LEN = ipv6.HEADER_LEN + UDP_HEADER_LEN

_deadline_of = itemgetter(0)


def _name_end(buf: Buffer, n: int) -> int:
    """Offset just past the name at the question's start, if it is plain; else -1.

    Plain: uncompressed, labels of at most 63 bytes, at most 255 bytes in all,
    inside the message. Such a name reads the same here as with
    :func:`pyslirp.wire.dns.read_name`; anything else (a compression pointer, a
    name cut short) is left to that careful parser.
    """
    pos = _QNAME
    limit = min(n, _QNAME + dns.MAX_NAME_LEN)
    while pos < limit:
        length = buf[pos]
        if length == 0:
            return pos + 1
        if length > 63:
            return -1
        pos += length + 1
    return -1


class DnsQuery:
    """One guest query in flight: the entry of the ID map (``pending``, ``inflight``).

    The runtime may read ``guest_ip``, ``guest_port``, ``query_id``,
    ``attempt``, ``upstream``, ``wire_id`` and ``data``.
    """

    __slots__ = ("key", "guest_ip", "guest_port", "query_id", "wire", "question",
                 "upstreams", "attempt", "wire_id", "earlier", "last_reply", "done")

    def __init__(self, key: tuple[bytes, int, int], wire: bytearray, question: bytes | None,
                 upstreams: tuple[Upstream, ...]) -> None:
        #: (guest address, guest port, the guest's ID): what identifies it in ``pending``.
        self.key = key
        self.guest_ip, self.guest_port, self.query_id = key
        #: The query as the guest sent it but for its first two bytes, which hold the ID
        #: of the attempt in progress: every attempt sends this one buffer.
        self.wire = wire
        #: The question section as the guest wrote it (name, type, class), for matching
        #: replies byte for byte; None when the name is not plain (then the parser
        #: matches them).
        self.question = question
        self.upstreams = upstreams
        #: Index into ``upstreams`` of the attempt in progress.
        self.attempt = 0
        #: The ID the attempt in progress was sent under.
        self.wire_id = -1
        #: (upstream, ID) of the earlier attempts, if any: they stay registered (a late
        #: answer is welcome) until the query finishes.
        self.earlier: list[tuple[Upstream, int]] | None = None
        #: The last SERVFAIL/REFUSED answer (as the upstream sent it, with its ID),
        #: sent to the guest if nothing better comes.
        self.last_reply: bytes | None = None
        self.done = False

    @property
    def upstream(self) -> Upstream:
        return self.upstreams[self.attempt]

    @property
    def data(self) -> bytes:
        """The query exactly as the guest sent it (its own ID)."""
        return _U16.pack(self.query_id) + bytes(self.wire[2:])

    def parsed_question(self) -> dns.Question | None:
        return dns.DnsMessage(self.wire).question()

    def __repr__(self) -> str:
        return (f"DnsQuery({ipaddress.ip_address(self.guest_ip)}:{self.guest_port} "
                f"id={self.query_id} {self.parsed_question()!r} attempt={self.attempt})")


class DnsForwarder:
    def __init__(self, config: NetConfig, link: Link, host: HostPort, timers: Timers) -> None:
        self.config = config
        self.link = link
        self.host = host
        self.timers = timers
        #: A tuple: each query takes it as its own list of upstreams, without a copy.
        self._upstreams: tuple[Upstream, ...] = tuple(config.dns_upstreams)
        self.attempt_timeout = DEFAULT_ATTEMPT_TIMEOUT
        self.max_pending = DEFAULT_MAX_PENDING
        self.pending: dict[tuple[bytes, int, int], DnsQuery] = {}
        #: The attempts waiting at each upstream, by the ID each was sent under.
        self.inflight: dict[Upstream, dict[int, DnsQuery]] = {}
        #: Where attempt IDs come from (tests substitute their own).
        self.random_bytes: Callable[[int], bytes] = _SYSTEM_RANDOM.randbytes
        self._ids: list[int] = []
        #: (deadline, query, attempt index) of every attempt, in deadline order.
        self._expiry: deque[tuple[float, DnsQuery, int]] = deque()
        #: Entries of ``_expiry`` that are stale (an estimate, never below the truth:
        #: an entry may be counted when it has already left the queue).
        self._expiry_stale = 0
        #: When the shared Timers heap wakes us (Timers' client protocol).
        self.timer_deadline: float | None = None
        # Optional in the HostPort contract (added later): older runtimes lack it.
        self._release: Callable[[Upstream], None] | None = getattr(host, "dns_release", None)
        self._counters = link.counters
        self._src = config.dns
        # Reply frame headers for the last guest answered (see _make_template).
        self._template_ip = self._template_mac = b""
        self._template = self._template_id = b""
        self._ip_base = self._pseudo_base = 0
        self._off = self._l4 = 0
        self._v6 = self._offload = False
        # Largest UDP payload that fits the link without IP fragmentation, by the
        # width of the guest's address (4: IPv4, 16: IPv6).
        self._max_payload = {4: config.mtu - _IP_UDP_LEN, 16: config.mtu - _IP6_UDP_LEN}

    @property
    def upstreams(self) -> list[Upstream]:
        """Where queries go, in order; set by the runtime (config or resolv.conf)."""
        return list(self._upstreams)

    @upstreams.setter
    def upstreams(self, value: Iterable[Upstream]) -> None:
        self._upstreams = tuple(value)
        current = set(self._upstreams)
        for upstream, table in list(self.inflight.items()):
            if not table and upstream not in current:
                self._drop_upstream(upstream)

    # ---- from the guest -------------------------------------------------------

    def handle_query(self, ip: Ipv4Packet | Ipv6Packet, udp: UdpDatagram, now: float) -> None:
        """A UDP datagram from the guest to the DNS address, port 53 (IPv4's or IPv6's:
        the guest's address width tells the answer's family)."""
        data = udp.payload
        n = len(data)
        if n < dns.HEADER_LEN:
            self.link.count("dns.drop.malformed")
            return
        query_id, flags, qdcount = _HEAD.unpack_from(data)
        if flags & _NOT_A_QUERY:
            self._not_a_query(ip.src, udp.src_port, data, flags)
            return
        raw = bytes(data)
        end = _name_end(raw, n) if qdcount == 1 else -1
        if 0 <= end <= n - 4:
            question: bytes | None = raw[_QNAME:end + 4]
        else:
            try:
                parsed = dns.DnsMessage(raw).question() if qdcount == 1 else None
            except MalformedPacket:
                parsed = None
            if parsed is None:
                self.link.count("dns.formerr")
                self._answer(ip.src, udp.src_port, dns.build_error_reply(raw, dns.RCODE_FORMERR))
                return
            question = None
        guest_ip = ip.src
        guest_port = udp.src_port
        key = (guest_ip, guest_port, query_id)
        pending = self.pending
        if key in pending:
            self.link.count("dns.drop.retransmit")
            return
        if not self._upstreams:
            self.link.count("dns.no_upstream")
            self._answer(guest_ip, guest_port, dns.build_error_reply(raw, dns.RCODE_SERVFAIL))
            return
        if len(pending) >= self.max_pending:
            self.link.count("dns.drop.pending_limit")
            return
        query = DnsQuery(key, bytearray(raw), question, self._upstreams)
        pending[key] = query
        self._counters["dns.query"] += 1
        self._send_attempt(query, now)

    def _not_a_query(self, guest_ip: bytes, guest_port: int, data: Buffer, flags: int) -> None:
        """A response sent to us (dropped), or another opcode than QUERY (NOTIMP)."""
        if flags & dns.FLAG_QR:
            self.link.count("dns.drop.not_query")
            return
        self.link.count("dns.notimp")
        self._answer(guest_ip, guest_port, dns.build_error_reply(data, dns.RCODE_NOTIMP))

    # ---- from the runtime -----------------------------------------------------

    def upstream_datagram(self, upstream: Upstream, data: bytes | bytearray, now: float) -> None:
        """A datagram arrived on ``upstream``'s socket."""
        if len(data) < dns.HEADER_LEN:
            self.link.count("dns.drop.bad_reply")
            return
        table = self.inflight.get(upstream)
        wire_id = data[0] << 8 | data[1]
        query = table.get(wire_id) if table is not None else None
        if query is None:
            self.link.count("dns.drop.mismatched_reply")
            return
        _id, flags, qdcount = _HEAD.unpack_from(data)
        question = query.question
        # The common answer, taken without another call: a response that is neither
        # SERVFAIL nor REFUSED, with the query's question byte for byte.
        if (flags & _ANSWER_MASK == dns.FLAG_QR and qdcount and question is not None
                and data.startswith(question, _QNAME)
                and flags & dns.RCODE_MASK not in _RCODES_FAIL_OVER):
            self._finish(query, data, True)
            return
        self._reply(query, upstream, wire_id, data, flags, qdcount, now)

    def upstream_error(self, upstream: Upstream, now: float, wire_id: int | None = None) -> None:
        """``upstream``'s socket reported an error (e.g. ICMP port unreachable) for the
        datagram sent under ``wire_id``, or, when None, for one it cannot name."""
        table = self.inflight.get(upstream)
        if not table:
            return
        if wire_id is not None:
            query = table.get(wire_id)
            targets = [query] if query is not None and query.wire_id == wire_id else []
        else:
            targets = list(table.values())
        for query in targets:
            if not query.done and query.upstreams[query.attempt] == upstream:
                self.link.count("dns.upstream_failed")
                self._next_attempt(query, now)

    def upstream_failed(self, query: DnsQuery, now: float,
                        upstream: Upstream | None = None) -> None:
        """An attempt of ``query`` (to ``upstream``, if given) could not be sent."""
        if query.done:
            return
        self.link.count("dns.upstream_failed")
        if upstream is None or upstream == query.upstreams[query.attempt]:
            self._next_attempt(query, now)

    def on_timer(self, now: float) -> None:
        """The earliest attempt deadline came (Timers' client protocol)."""
        expiry = self._expiry
        while expiry:
            deadline, query, attempt = expiry[0]
            if query.done or query.attempt != attempt:
                expiry.popleft()
                if self._expiry_stale:
                    self._expiry_stale -= 1
                continue
            if deadline > now:
                break
            expiry.popleft()
            self.link.count("dns.upstream_timeout")
            self._next_attempt(query, now)
        if expiry:
            self.timers.schedule(self, expiry[0][0])

    # ---- internals ------------------------------------------------------------

    def _reply(self, query: DnsQuery, upstream: Upstream, wire_id: int, data: bytes | bytearray,
               flags: int, qdcount: int, now: float) -> None:
        """A datagram under an attempt's ID that is not the common answer (see
        :meth:`upstream_datagram`): match it the careful way, fail over or answer."""
        rcode = flags & dns.RCODE_MASK
        if not flags & dns.FLAG_QR:
            self.link.count("dns.drop.mismatched_reply")
            return
        if qdcount == 0:
            if rcode not in _RCODES_WITHOUT_QUESTION:
                self.link.count("dns.drop.mismatched_reply")
                return
        else:
            question = query.question
            if question is None or not data.startswith(question, _QNAME):
                # Not the same bytes: maybe the same question compressed or spelt
                # otherwise (names compare case-insensitively); the wire parser decides.
                try:
                    theirs = dns.DnsMessage(data).question()
                    ours = query.parsed_question()
                except MalformedPacket:
                    self.link.count("dns.drop.bad_reply")
                    return
                if theirs is None or ours is None or theirs.key() != ours.key():
                    self.link.count("dns.drop.mismatched_reply")
                    return
        if rcode in _RCODES_FAIL_OVER:
            query.last_reply = bytes(data)
            self.link.count("dns.upstream_servfail")
            # A late one from an earlier attempt only sets what the guest gets if all fail.
            if wire_id == query.wire_id and upstream == query.upstreams[query.attempt]:
                self._next_attempt(query, now)
            return
        self._finish(query, data, True)

    def _new_id(self, table: dict[int, DnsQuery]) -> int:
        ids = self._ids
        while True:
            if not ids:
                ids.extend(array("H", self.random_bytes(_ID_BATCH_BYTES)))
            wire_id = ids.pop()
            if wire_id not in table:
                return wire_id

    def _send_attempt(self, query: DnsQuery, now: float) -> None:
        upstream = query.upstreams[query.attempt]
        table = self.inflight.get(upstream)
        if table is None:
            table = self.inflight[upstream] = {}
        ids = self._ids
        wire_id = ids.pop() if ids else -1
        if wire_id < 0 or wire_id in table:
            wire_id = self._new_id(table)
        table[wire_id] = query
        if query.wire_id >= 0:
            earlier = query.earlier
            if earlier is None:
                earlier = query.earlier = []
            earlier.append((query.upstreams[query.attempt - 1], query.wire_id))
        query.wire_id = wire_id
        deadline = now + self.attempt_timeout
        entry = (deadline, query, query.attempt)
        expiry = self._expiry
        if expiry and deadline < expiry[-1][0]:
            insort(expiry, entry, key=_deadline_of)  # attempt_timeout was lowered
        else:
            expiry.append(entry)
        if self.timer_deadline is None or deadline < self.timer_deadline:
            self.timers.schedule(self, deadline)
        # The query under the attempt's ID: its one buffer, the first two bytes rewritten.
        wire = query.wire
        _U16.pack_into(wire, 0, wire_id)
        self.host.dns_send(query, upstream, wire)

    def _went_stale(self) -> None:
        """One more entry of the deadline queue is stale: rebuild the queue (in place:
        on_timer may be iterating it) once they are more than half of it."""
        self._expiry_stale += 1
        if self._expiry_stale > _EXPIRY_COMPACT_MIN and self._expiry_stale * 2 > len(
                self._expiry):
            self._compact_expiry()

    def _compact_expiry(self) -> None:
        expiry = self._expiry
        live = [e for e in expiry if not e[1].done and e[1].attempt == e[2]]
        expiry.clear()
        expiry.extend(live)
        self._expiry_stale = 0

    def _next_attempt(self, query: DnsQuery, now: float) -> None:
        self._went_stale()  # the attempt's entry (if on_timer has not just taken it)
        if query.attempt + 1 < len(query.upstreams):
            query.attempt += 1
            self._send_attempt(query, now)
            return
        self.link.count("dns.all_upstreams_failed")
        reply = query.last_reply
        if reply is not None:
            self._finish(query, reply, True)
        else:
            self._finish(query, dns.build_error_reply(query.data, dns.RCODE_SERVFAIL), False)

    def _finish(self, query: DnsQuery, reply: Buffer, from_upstream: bool) -> None:
        """Answer the guest; ``reply`` carries the ID it was sent under if ``from_upstream``."""
        query.done = True
        del self.pending[query.key]
        # _went_stale's body, inline (once per query): the attempt's entry is stale.
        self._expiry_stale += 1
        if self._expiry_stale > _EXPIRY_COMPACT_MIN and self._expiry_stale * 2 > len(
                self._expiry):
            self._compact_expiry()
        inflight = self.inflight
        upstream = query.upstreams[query.attempt]
        table = inflight.get(upstream)
        if table is not None and table.get(query.wire_id) is query:
            del table[query.wire_id]
            if not table and upstream not in self._upstreams:
                self._drop_upstream(upstream)
        if query.earlier is not None:
            for upstream, wire_id in query.earlier:
                table = inflight.get(upstream)
                if table is not None and table.get(wire_id) is query:
                    del table[wire_id]
                    if not table and upstream not in self._upstreams:
                        self._drop_upstream(upstream)
        # Forget finished attempts at the front of the deadline queue now, so that
        # finished queries are not kept alive until their deadlines.
        expiry = self._expiry
        while expiry:
            head = expiry[0]
            if head[1].done or head[1].attempt != head[2]:
                expiry.popleft()
                if self._expiry_stale:
                    self._expiry_stale -= 1
            else:
                break
        self.host.dns_cancel(query)
        self._answer(query.guest_ip, query.guest_port, reply,
                     query.query_id if from_upstream else None)

    def _drop_upstream(self, upstream: Upstream) -> None:
        del self.inflight[upstream]
        if self._release is not None:
            self._release(upstream)

    def _answer(self, guest_ip: bytes, guest_port: int, data: Buffer,
                query_id: int | None = None) -> None:
        """Send ``data`` to the guest, with its first two bytes replaced by ``query_id``
        if given (an upstream's answer gets the guest's ID back without a copy).

        One path for both families: the reply headers come from a template made for
        the last guest answered (see :meth:`_make_template`); per reply only the
        lengths, the IPv4 ID and header checksum, the guest's port and the UDP
        checksum (its pseudo-header part, when the link checksums for us) are written.
        """
        link = self.link
        if len(data) > self._max_payload[len(guest_ip)]:
            short = self._truncated(data, query_id, len(guest_ip))
            if short is None:
                return
            data, query_id = short, None
        mac = link.guest_mac
        if mac is None:
            link.count("drop.tx.no_guest_mac")
            return
        if guest_ip != self._template_ip or mac != self._template_mac:
            self._make_template(guest_ip, mac)
        off = self._off
        l4 = self._l4
        ulen = UDP_HEADER_LEN + len(data)
        if query_id is None:
            head = bytearray(self._template)
            body: Buffer = data
        else:
            head = bytearray(self._template_id)
            _U16.pack_into(head, l4 + UDP_HEADER_LEN, query_id)
            body = memoryview(data)[2:]
        if self._v6:
            _U16.pack_into(head, off + _IP6_PAYLOAD_LEN, ulen)
        else:
            ip_len = ipv4.MIN_HEADER_LEN + ulen
            ident = link.next_ip_id()
            # Ones' complement sums mod 0xFFFF, as in pyslirp.wire.checksum.
            ip_csum = (~((self._ip_base + ip_len + ident) % 0xFFFF) & 0xFFFF) or 0xFFFF
            _IP_LEN_ID.pack_into(head, off + _IP_START + 2, ip_len, ident)
            _U16.pack_into(head, off + _IP_CSUM, ip_csum)
        pseudo = (self._pseudo_base + ulen) % 0xFFFF
        if self._offload:
            _UDP_HEAD.pack_into(head, l4, dns.PORT, guest_port, ulen, pseudo)
        else:
            _UDP_HEAD.pack_into(head, l4, dns.PORT, guest_port, ulen, 0)
            # The header part is 8 or 10 bytes: even, so the two sums add up. (IPv6
            # has no "no checksum": a zero sum goes out as 0xFFFF, as finish gives.)
            total = partial_sum(body, partial_sum(memoryview(head)[l4:], pseudo))
            _U16.pack_into(head, l4 + 6, finish(total))
        link.sink((head, body))  # (not link.send_frame: the same, one call fewer)

    def _truncated(self, data: Buffer, query_id: int | None, addr_len: int) -> bytes | None:
        """The truncated form (TC) of a reply too big for the link, with the guest's ID;
        None (counted) when even that does not fit."""
        link = self.link
        link.count("dns.truncated_for_mtu")
        if query_id is not None:
            data = _U16.pack(query_id) + bytes(data[2:])
        short = dns.build_truncated(data)
        if len(short) > self._max_payload[addr_len]:
            # Even header and question do not fit (a tiny MTU): nothing can be sent.
            link.count("drop.tx.over_mtu")
            return None
        return short

    def _make_template(self, guest_ip: bytes, mac: bytes) -> None:
        """Reply headers to ``guest_ip`` (IPv4 or IPv6 by its width) without the fields
        that change per reply (lengths, IPv4 ID, checksums, guest port), and their
        checksums' fixed parts."""
        link = self.link
        off = vnet.HEADER_LEN if link.vnet_hdr else 0
        v6 = len(guest_ip) == 16
        frame = _FRAME6 if v6 else _FRAME
        l4 = off + (L4_START6 if v6 else _L4_START)
        head = bytearray(off + frame.size)
        if link.offload:
            head[:off] = vnet.build(vnet.F_NEEDS_CSUM, vnet.GSO_NONE, frame.size, 0, l4 - off, 6)
        elif off:
            head[:off] = vnet.PLAIN
        if v6:
            src = self.config.dns6
            _FRAME6.pack_into(head, off, mac, link.our_mac, ETHERTYPE_IPV6, IPV6_VERSION_WORD,
                              0, UDP_PROTO, 64, src, guest_ip, dns.PORT, 0, 0, 0)
            self._pseudo_base = ipv6.pseudo_header_sum(src, guest_ip, UDP_PROTO, 0)
        else:
            _FRAME.pack_into(head, off, mac, link.our_mac, ETHERTYPE_IPV4,
                             0x45, 0, 0, 0, ipv4.FLAG_DF, 64, UDP_PROTO, 0, self._src,
                             guest_ip, dns.PORT, 0, 0, 0)
            self._ip_base = partial_sum(head[off + _IP_START:off + _L4_START])
            self._pseudo_base = pseudo_header_sum(self._src, guest_ip, UDP_PROTO, 0)
        self._template = bytes(head)
        self._template_id = bytes(head) + b"\0\0"
        self._off, self._l4, self._v6 = off, l4, v6
        self._offload = link.offload
        self._template_ip, self._template_mac = guest_ip, mac

    def close_all(self) -> None:
        """Give up every query in flight (shutdown): each guest gets a SERVFAIL, and
        the runtime may close every upstream's socket."""
        for query in list(self.pending.values()):
            self._finish(query, dns.build_error_reply(query.data, dns.RCODE_SERVFAIL), False)
        self._expiry.clear()
        self._expiry_stale = 0
        for upstream in list(self.inflight):
            self._drop_upstream(upstream)


def parse_resolv_conf(text: str) -> tuple[list[str], list[str]]:
    """Nameservers and search domains from resolv.conf(5) text.

    Follows glibc: ``#`` or ``;`` starts a comment (at the start of a line,
    and here also after whitespace); ``nameserver`` takes one address;
    ``search`` and ``domain`` both set the search list and the last one wins.
    Invalid addresses are skipped; duplicates are kept once, in order.
    IPv6 nameservers (including link-local ones with a ``%zone``) are kept, as
    text: they are recognisable by containing ``:`` (see :func:`is_ipv6`). Trailing
    dots are removed from search domains, and the root domain is dropped, as
    is (with a warning) a name DHCP cannot serve
    (:func:`~pyslirp.stack.config.valid_search_domains`).
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
    return nameservers, valid_search_domains(search, "resolv.conf")


def is_ipv6(nameserver: str) -> bool:
    """Whether a nameserver from :func:`parse_resolv_conf` is an IPv6 address."""
    return ":" in nameserver


def ipv4_upstreams(nameservers: list[str], port: int = dns.PORT) -> list[tuple[str, int]]:
    """The IPv4 nameservers as ``(address, port)`` upstreams, in order."""
    return [(ns, port) for ns in nameservers if not is_ipv6(ns)]
