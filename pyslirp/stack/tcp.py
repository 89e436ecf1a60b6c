"""TCP termination: the guest's TCP connections, relayed to host sockets.

Theory of operation
-------------------
Every TCP connection the guest opens is terminated here by a full TCP
endpoint (:class:`TcpFlow`, one per 4-tuple) that impersonates the remote
peer, while the runtime opens an ordinary host socket to the real destination
(through :class:`~pyslirp.stack.host.HostPort`). Bytes then flow:

* guest -> host: in-order payload goes to ``host.tcp_write`` straight from the
  frame's memoryview; only what the host socket did not take is copied into a
  bounded *backlog*. The window we advertise is the receive space minus the
  backlog and held out-of-order data, so a host peer that stops reading
  closes the guest's window instead of growing our memory. It is rounded
  down to the window-scale unit, and each held segment is charged
  ``CHUNK_OVERHEAD`` bytes besides its payload (what a ``bytes`` object and
  its deque slot cost), so tiny segments close the window in proportion to
  the heap they take; what arrives past that anyway is not acknowledged.
* host -> guest: what the runtime reads lands in a *send queue*
  (:class:`~pyslirp.stack.sendqueue.SendQueue`: a deque of immutable ``bytes``
  chunks, trimmed from the left as the guest acknowledges, never copied
  again), from which frames are cut. With the link's offloads
  one frame carries up to ~64 KB as a GSO_TCPV4 super-frame whose checksum
  the kernel finishes (vnet NEEDS_CSUM); without them we cut MSS-sized
  segments and compute full checksums. Payload bytes are passed to the link
  as memoryview slices of the queued chunks (which never change), so the
  runtime may hold them as long as it likes. When the send queue is full we
  ask the runtime to pause reading, and resume it when the guest's ACKs free
  half of it. How much it may hold (``snd_limit``, which also caps cwnd)
  starts at ``snd_buf`` and grows only while the guest's ACKs come late, in
  the spirit of Linux's send-buffer auto-tuning: a flow held by its send
  limit has the limit in flight, so its rate is limit / RTT and its RTT
  mostly its own queueing; an RTT over what the flow's best recent rate
  gives at that limit (a rate under half that best) means the ACKs wait
  elsewhere, behind a guest's flood in the TAP's ring. Then, if cwnd and the
  guest's window are above the limit, it doubles, up to ``snd_buf_max`` and
  the flow's share of the budget (below). A doubling that does not raise the
  rate by a fifth is undone, and the limit holds off growing for 2 s: the
  flow was held by something else (the stack's share of the CPU, as under a
  SYN flood). Once the rate is back near its best the limit halves toward
  ``snd_buf``, as a longer queue costs an unloaded download its cache and
  does not raise its rate. This is looked at when the queue reaches the
  limit, at most every 100 ms (:meth:`TcpFlow._tune_send_limit`), never on
  the per-segment path.

Memory is bounded per flow (``rcv_buf``, ``snd_buf``) and for the whole
engine: ``NetConfig.max_buffered`` (``--max-buffered``, 256 MiB by default)
caps what all flows hold together, counted in :attr:`TcpEngine.buffered`
where buffers grow and shrink (no per-frame work beyond that arithmetic).
It is cut into max(connected flows + ``BUDGET_RESERVE`` (4),
``BUDGET_SHARES`` (16)) equal shares: each flow may hold one, and all
together leave ``BUDGET_RESERVE`` shares free (:meth:`TcpEngine.room_for`).
So stalled flows cannot starve one whose peers keep reading, a flow that
opens while stalled flows hold all they may still finds room (a whole share
while there are few flows; past that the free shares shrink as it comes, and
what they give up is its), and all together stay within the budget. Below
one share in total nobody is checked, so the per-frame path does no more
than compare two numbers. As a
flow's room runs out its window shrinks toward 0 (by not reopening: what
was advertised is honoured as far as the budget allows), ``host_read_budget``
drops to 0 (the runtime stops reading) and guest data that would need
buffering is refused (``tcp.drop.max_buffered``); the flows so held back
are noted in :attr:`TcpEngine.starved`. A flow's own ACKs and host writes
reopen its window or resume its reading when its own room opens; the others
are looked at again (:meth:`TcpEngine.release_starved`) when the total falls
to ``low_water``: a quarter of the budget, or, once a flow was held back by
the total, 1/64 of the budget below the total it saw, so what a leaving or
draining flow frees goes to the held-back flows at once, not only when the
total has fallen far (which stalled flows never let it). Each is resumed if
it has room of its own by then.

Connection set-up follows slirp: the guest's SYN starts the host connect and
is answered only once the host side is known, with a SYN-ACK when it
connected, an RST when it was refused, and ICMP destination-unreachable
(quoting the SYN) when the host network said so; a destination the policy
refuses gets ICMP net-unreachable at once. Duplicate SYNs meanwhile are
ignored. The flow table and the number of half-open flows are bounded
(:class:`TcpConfig`), and new flows pass a token bucket first
(``NetConfig.new_flow_rate``/``new_flow_burst``, see
:mod:`pyslirp.stack.admission`; destinations that lately accepted a
connection are exempt): excess SYNs are dropped and counted before any host
syscall. While the bucket is empty the stack offers each frame to
:meth:`TcpEngine.shed_syn` before parsing it, which refuses a plain new SYN
from the raw bytes as the full path would (same counter, same state; anything
unusual takes the full path: tests/stack/test_tcp_syn_shedding.py), so a SYN
flood costs a few byte reads per frame rather than three header parses. Past
``admission.FLOOD_ENGAGE`` times the rate, :meth:`TcpEngine.review_flood` asks the
device to drop most of those SYNs unread, in the guest's kernel (a
:class:`SynFloodFilter`, as UDP's flood filter: :mod:`pyslirp.stack.admission`),
sparing the known peers of the flooded destinations. Flows opened
toward the guest (port forwarding, :meth:`TcpEngine.open_to_guest`) are
counted apart with limits of their own, so host clients cannot use up the
guest's allowance.

Followed (RFC 9293 section 3.10 event processing, simplified where a NAT can):
sequence/ACK acceptability and RST generation for unknown flows (3.10.7.1);
RST validation and challenge ACKs for in-window RST/SYN (RFC 5961 3, 4);
MSS (3.7.1: ours is MTU-40, we honour the guest's, 536 when absent) and
window scaling (RFC 7323 2, only when the guest offers it); retransmission
timer per RFC 6298 (Karn's algorithm with one timed segment, 200 ms
minimum, 60 s maximum, exponential backoff, give up after
``max_retries``: RST to the guest, reset the host socket); Reno congestion
control (RFC 5681: slow start, fast retransmit on the third duplicate ACK,
NewReno partial ACKs per RFC 6582, byte counting per RFC 3465) so a queue
that overflowed is not flooded again; tail loss probes (RFC 8985 7), since
a Linux guest whose reader lags delays its ACKs past our 200 ms RTO;
receiver silly-window avoidance (RFC 1122 4.2.3.3); zero-window probing
(persist timer, RFC 9293 3.8.6.1); half-close in both directions,
simultaneous close and a short TIME_WAIT (a NAT's guest-side four-tuple is
private, so seconds suffice; a full table recycles the oldest TIME_WAIT
flow); keepalive probes toward an idle guest (RFC 1122 4.2.3.6).

ACKs are coalesced: segments of one batch of guest frames only mark their
flow, and :meth:`TcpEngine.flush` (called by the stack after each batch)
sends one ACK per marked flow, or nothing when outgoing data carries it.
Out-of-order segments are answered at once, so the guest's fast retransmit
sees one duplicate ACK per segment.

Header prediction (Van Jacobson's fast path, as in the BSD and Linux stacks):
every segment for a known flow enters :meth:`TcpFlow._receive`, which handles
the common case whole in one function, an ESTABLISHED flow getting in-order
data or a pure ACK of new data with no flag but ACK/PSH and no options (we
negotiate no timestamps), and hands anything else to the general
:meth:`TcpFlow._segment`. The output half, :meth:`TcpFlow._xmit_fast`, builds
the common outgoing segment (data or an ACK, no options, offloads on) with one
``pack`` of a fused vnet+Ethernet+IP+TCP template; the rest goes through
:meth:`TcpFlow._xmit`. ``flush`` and ``host_data`` call ``_output`` only
when it has something to send. tests/stack/test_tcp_fastpath.py holds both
halves to the general path's results, and checks that every unusual segment
(out of order, FIN, RST, URG, SACK blocks, a window change with data, a zero
window probe, recovery ...) falls through.

SACK (RFC 2018) is negotiated when the guest offers it: our duplicate ACKs
carry blocks for the data we hold, and the guest's blocks mark its duplicate
ACKs as such (its reader keeps moving the window, which would otherwise
disqualify them) and tell us where the hole ends, so recovery resends just
the hole. There is no full RFC 6675 scoreboard: one hole per round trip, as
NewReno. With offloads a lost frame is a whole GSO super-frame that brings a
single duplicate ACK, so the duplicate-ACK threshold follows RFC 5827 (early
retransmit) counted in frames.

Where each concern lives
------------------------
* ``seq.py``: sequence-number arithmetic (``seq_add``, ``seq_diff``,
  ``seq_lt``, ``seq_le``, ``seq_window``). The per-frame path here
  (``_receive``, ``_segment``, ``_ack_field``, ``_acked``, ``_output``, ``_xmit``,
  ``_window``, ``_deliver``, ``_restart_timer``) writes the same expressions
  inline with ``SEQ_MASK``/``SEQ_HALF``, as each helper call is counted by
  tests/test_hotpath_budget.py; those functions say so in a comment. So do
  the once-per-connection steps (``_new_syn``, ``_handshake_acked``,
  ``_established``, ``_fin_sent``, ``_on_fin``), whose calls the short
  connection budget counts.
* ``tcpstate.py``: the states (:class:`~pyslirp.stack.tcpstate.TcpState`) and
  the table of allowed transitions; every state change goes through
  :meth:`TcpFlow._to`, which refuses a move the table does not list.
* ``rtt.py``: RFC 6298 estimation, Karn's timed segment and back-off
  (``TcpFlow.rtt``).
* ``reassembly.py``: out-of-order segments and the SACK blocks describing
  them (``TcpFlow.ooo``); the flow decides what may be stored (segment cap,
  memory budget).
* ``sendqueue.py``: the send queue and the slicer that cuts frames from it
  (``TcpFlow.send_queue``).
* ``pyslirp/wire/frame.py``: the fused Ethernet+IPv4+TCP header template
  ``_xmit`` fills with one ``pack_into``, and the vnet-fused one ``_xmit_fast``
  packs whole.
* Here, in :class:`TcpFlow`: segment processing (``_receive``, the fast path,
  then ``_segment``, which runs the general case and branches out to
  ``_segment_rst``, ``_segment_syn``,
  ``_trim_to_window`` ...), the ACK field and congestion control
  (``_ack_field``, ``_acked``, ``_fast_retransmit``), output (``_output``,
  ``_xmit``, ``_window``), timers (``on_timer``: ``_on_rto`` with
  ``_resend_syn``/``_probe_zero_window``/``_go_back_n``/tail loss probes, and
  ``_on_idle`` for keepalive and TIME_WAIT), delivery to the host with its
  backlog (``_deliver``, ``_hold``, ``host_writable``) and the memory budget;
  in :class:`TcpEngine`: the flow table, its limits, SYN handling and the
  shared budget (``room_for``, ``release_starved``).

Deliberately not done: timestamps are not negotiated (the link is a local
queue; Karn's algorithm suffices), urgent data is delivered inline, ECN is
ignored, IP options are ignored, TCP Fast Open data on a SYN is dropped (the
guest resends it). Timers are lazy: each flow has
one entry in the shared :class:`~pyslirp.stack.timers.Timers` heap, pushed
only when a deadline moves earlier; a wake-up that finds nothing due
re-arms for the next deadline, so per-ACK timer restarts cost nothing.
"""

from __future__ import annotations

import errno
import math
import random
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any

from pyslirp.stack.admission import FloodWatch, KnownPeers, TokenBucket
from pyslirp.stack.config import NetConfig
from pyslirp.stack.host import HostPort, Policy
from pyslirp.stack.link import Link
from pyslirp.stack.reassembly import OutOfOrderStore
from pyslirp.stack.rtt import RttEstimator
from pyslirp.stack.sendqueue import SendQueue
from pyslirp.stack.seq import SEQ_HALF, SEQ_MASK, seq_add, seq_diff, seq_lt, seq_window
from pyslirp.stack.tcpstate import TRANSITIONS, TcpState, next_state
from pyslirp.stack.timers import Timers
from pyslirp.wire import icmp, icmpv6, ipv6, vnet
from pyslirp.wire import tcp as wtcp
from pyslirp.wire.checksum import finish, partial_sum
from pyslirp.wire.errors import MalformedPacket
from pyslirp.wire.frame import (
    ETH_IPV4_TCP,
    ETH_IPV6_TCP,
    IPV6_VERSION_WORD,
    L4_START,
    L4_START6,
    VNET_ETH_IPV4_TCP,
    VNET_ETH_IPV6_TCP,
    TcpVnetHeaders,
)
from pyslirp.wire.ipv4 import Ipv4Packet
from pyslirp.wire.ipv6 import Ipv6Packet

IpPacket = Ipv4Packet | Ipv6Packet

FIN, SYN, RST, PSH, ACK = wtcp.FIN, wtcp.SYN, wtcp.RST, wtcp.PSH, wtcp.ACK


# Flow states (see tcpstate.py), as module names: a global lookup on the per-frame
# path, not an attribute lookup on the enum class.
CONNECTING, SYN_SENT, SYN_RCVD = TcpState.CONNECTING, TcpState.SYN_SENT, TcpState.SYN_RCVD
ESTABLISHED, CLOSE_WAIT, LAST_ACK = TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.LAST_ACK
FIN_WAIT_1, FIN_WAIT_2, CLOSING = TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2, TcpState.CLOSING
TIME_WAIT, CLOSED = TcpState.TIME_WAIT, TcpState.CLOSED

#: States in which the guest may still send us data.
_RCV_OPEN = frozenset((ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2))
#: States in which we may send data (and our FIN) to the guest.
_SND_STATES = frozenset((ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK))
_HALF_OPEN = frozenset((CONNECTING, SYN_RCVD, SYN_SENT))

# Ethernet + IPv4 (no options) + fixed TCP header, one pack_into per frame.
_FRAME = ETH_IPV4_TCP
_FRAME_LEN = ETH_IPV4_TCP.size
_VNET = struct.Struct("<BBHHHHH")
_CSUM_START = L4_START
# The same for IPv6 flows (40-byte header, no extension headers).
_FRAME6 = ETH_IPV6_TCP
_FRAME6_LEN = ETH_IPV6_TCP.size
_CSUM_START6 = L4_START6
# The common segment (see _xmit_fast): vnet header included, by GSO size (0: none).
_FAST = VNET_ETH_IPV4_TCP
_FAST6 = VNET_ETH_IPV6_TCP
_FAST_VNET = TcpVnetHeaders(L4_START, vnet.GSO_TCPV4)
_FAST_VNET6 = TcpVnetHeaders(L4_START6, vnet.GSO_TCPV6)
_DEFAULT_MSS = 536  # RFC 9293 3.7.1, when the guest sends no MSS option
_MAX_IP_PAYLOAD = 65535 - 20

# Host connect errors that become ICMP errors rather than an RST (as a router
# would report them); everything else becomes an RST.
_ICMP_FOR_ERRNO = {
    errno.ENETUNREACH: icmp.NET_UNREACH,
    errno.ENETDOWN: icmp.NET_UNREACH,
    errno.EHOSTUNREACH: icmp.HOST_UNREACH,
    errno.EHOSTDOWN: icmp.HOST_UNREACH,
    errno.ETIMEDOUT: icmp.HOST_UNREACH,
}
_UNSPECIFIED6 = bytes(16)
#: The ICMPv6 destination-unreachable code (RFC 4443 3.1) for each ICMP one above.
_ICMPV6_CODE = {icmp.NET_UNREACH: 0, icmp.HOST_UNREACH: 3}


#: Bytes charged per buffered chunk (a segment held for the host) on top of its
#: payload: a ``bytes`` object's header (33) plus its deque slot, rounded up to the
#: allocator's granularity. 1-byte segments thus exhaust a budget in proportion to
#: the heap they really take (~56 bytes each), not to their payload.
CHUNK_OVERHEAD = 64

#: The shared budget is cut into max(connected flows + BUDGET_RESERVE, BUDGET_SHARES)
#: equal shares: each flow may hold one, and BUDGET_RESERVE shares always stay free
#: for flows yet to come (TcpEngine.room_for). With the default 256 MiB a share is
#: 16 MiB (more than a flow's own buffers) for up to 12 flows.
BUDGET_SHARES = 16
BUDGET_RESERVE = 4

#: The send limit (TcpFlow._tune_send_limit) is looked at when the send queue
#: reaches it, at most once per this many seconds and per four smoothed round
#: trips, so the delivery rate it compares is an average over that span.
_TUNE_INTERVAL = 0.1
#: The best delivery rate is forgotten linearly over this many seconds, so a flow
#: whose rate fell for good (the machine got busier) stops growing its limit.
_PEAK_MEMORY = 30.0
#: A rate below this fraction of the best means the ACKs come late: grow the
#: limit; above the second, they are back to what the flow does at its best:
#: shrink it. In between the limit stays (no see-saw while a flood lasts).
_GROW_BELOW = 0.5
_SHRINK_ABOVE = 0.7
#: A doubled limit must raise the rate by this factor by the next look, or it is
#: taken back and the limit does not grow again for _GROWTH_HOLD seconds: the
#: flow was held by something else than its ACKs (the stack's own share of the
#: CPU, under a SYN flood), and a longer queue only costs it the cache.
_GROWTH_PAYS = 1.2
_GROWTH_HOLD = 2.0

#: Encoded SYN options by (mss, wscale, sack_permitted): a handful of variants.
_SYN_OPTIONS: dict[tuple[int, int | None, bool], bytes] = {}


#: Destinations one SYN-flood filter covers, and the known peers (address, port) it
#: spares at most: a destination whose known peers would not fit is left out
#: (its SYNs are shed after the read, as before).
SYN_FLOOD_DESTINATIONS = 4
SYN_FLOOD_SPARED = 160


@dataclass(frozen=True)
class SynFloodFilter:
    """SYNs a device may drop before it reads them, while the guest floods.

    It covers plain SYNs (SYN without ACK or RST; IPv4 without options, no fragment)
    from ``guest_ip`` to one of ``destinations`` but not to a ``spared`` (address,
    port), the known peers there (admission.KnownPeers: they pass without a token):
    of those the device lets each through with probability ``keep`` and drops the
    rest unread. Everything else reaches the stack as before.
    """

    guest_ip: bytes
    destinations: tuple[bytes, ...]
    spared: tuple[tuple[bytes, int], ...]
    keep: float


@dataclass(slots=True)
class TcpConfig:
    """Limits and timers of the TCP engine (defaults suit a container's NAT)."""

    #: Flows the guest opens, and how many of them may be half-open.
    max_flows: int = 4096
    max_half_open: int = 1024
    #: Flows port forwarding opens toward the guest: counted apart, so host
    #: clients cannot use up the guest's own allowance (nor it theirs).
    max_inbound_flows: int = 1024
    max_inbound_half_open: int = 256
    #: Receive space per flow: bounds the advertised window and the backlog.
    rcv_buf: int = 4 << 20
    #: Send queue per flow (host data not yet acknowledged by the guest): where
    #: each flow's send limit starts and to which it returns.
    snd_buf: int = 4 << 20
    #: How far a flow's send limit may grow while the guest's ACKs come late
    #: (TcpFlow._tune_send_limit); never past the flow's share of the budget.
    #: Equal to ``snd_buf``: the limit never grows.
    snd_buf_max: int = 16 << 20
    max_ooo_segments: int = 64
    rto_initial: float = 1.0
    rto_min: float = 0.2
    rto_max: float = 60.0
    #: Retransmissions of data/FIN (or unanswered window probes) before giving up.
    max_retries: int = 10
    syn_retries: int = 5
    time_wait: float = 2.0
    #: After the guest has gone, how long data may wait for a host socket that
    #: does not read before the host socket is reset.
    drain_timeout: float = 60.0
    keepalive_idle: float = 600.0
    keepalive_interval: float = 30.0
    keepalive_count: int = 4

    def __post_init__(self) -> None:
        if self.snd_buf_max < self.snd_buf:
            raise ValueError(f"TcpConfig.snd_buf_max ({self.snd_buf_max}) must be at least "
                             f"snd_buf ({self.snd_buf})")


def _fold(s: int) -> int:
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


#: The 16-bit words of a flow's two addresses, by the width of one (IPv4 4, IPv6 16).
_PAIR_WORDS = {4: struct.Struct("!4H"), 16: struct.Struct("!16H")}


def _l4_offset(ip: IpPacket) -> int:
    """Where the TCP header starts in ``ip.buf`` (past options or extension headers)."""
    return ip.upper_offset if isinstance(ip, Ipv6Packet) else ip.header_len


def _unreachable(engine: TcpEngine, guest: bytes, code: int, quote: bytes | memoryview) -> None:
    """ICMP (IPv4) or ICMPv6 destination unreachable from the gateway, quoting the SYN.

    ``code`` is an ICMP (IPv4) code; an IPv6 guest gets its ICMPv6 counterpart.
    """
    link, config = engine.link, engine.config
    if len(guest) == 4:
        link.send_ipv4(config.gateway, guest, icmp.PROTO,
                       icmp.build_error(icmp.DEST_UNREACH, code, quote))
        return
    # RFC 4443 2.4 (c): as much of the packet as fits the minimum MTU.
    room = ipv6.MIN_MTU - ipv6.HEADER_LEN - 8
    body = b"\0\0\0\0" + bytes(quote[:room])
    link.send_ipv6(config.gateway6, guest, ipv6.PROTO_ICMPV6,
                   icmpv6.build(icmpv6.DEST_UNREACH, _ICMPV6_CODE.get(code, 0), body,
                                config.gateway6, guest))


class TcpFlow:
    """One guest TCP connection and its host counterpart.

    The runtime calls the ``host_*`` methods (each takes ``now``; none raises,
    and each is a no-op once the flow is closed); everything else is driven by
    the engine. ``host_handle`` is free for the runtime (its socket object);
    ``guest_addr``/``guest_port``/``remote_addr``/``remote_port`` name the
    connection (addresses as 4-byte ``bytes``). After ``host.tcp_close`` the
    engine makes no more host calls for the flow, and after
    ``host_connect_failed`` none at all.
    """

    __slots__ = (
        "engine", "link", "host", "cfg", "key", "guest_addr", "guest_port", "remote_addr",
        "remote_port", "host_handle", "state", "timer_deadline",
        # receive side (guest -> host); out-of-order data lives in ``ooo`` (reassembly.py)
        "irs", "rcv_nxt", "rcv_adv", "rcv_wscale", "backlog", "backlog_len", "ooo",
        "fin_rcvd", "host_shut", "host_closed", "host_connected_flag",
        # send side (host -> guest); unacknowledged data lives in ``send_queue`` (sendqueue.py)
        "iss", "snd_una", "snd_nxt", "snd_max", "snd_wnd", "snd_wl1", "snd_wl2", "snd_wscale",
        "mss", "max_burst", "send_queue", "fin_queued", "fin_seq", "fin_out", "reading_paused",
        # the send limit, grown while ACKs come late (_tune_send_limit)
        "snd_limit", "tune_at", "tune_acked", "peak_rate", "grew_at_rate", "tune_hold",
        # congestion control (RFC 5681, 6582) and the dup-ACK threshold (RFC 5827)
        "cwnd", "ssthresh", "dupacks", "recover", "in_recovery", "frame_ends",
        # timers; RTT/RTO estimation lives in ``rtt`` (rtt.py)
        "rtt", "rto_deadline", "idle_deadline", "retries", "probes", "persist", "last_rx",
        "tlp_armed",
        # framing: checksum sums precomputed from the addresses
        "ip_header_sum", "pseudo_header_sum", "ack_pending", "dirty", "syn_quote", "half_open",
        "inbound", "wscale_ok",
        # SACK (RFC 2018): negotiated, first SACKed sequence above snd_una
        "sack_ok", "sack_hole",
        # the address family: IPv6 frames use the IPv6 template (see _xmit)
        "v6",
    )

    def __init__(self, engine: TcpEngine, key: tuple[bytes, int, bytes, int],
                 now: float) -> None:
        self.engine = engine
        self.link = engine.link
        self.host = engine.host
        cfg = self.cfg = engine.cfg
        #: (guest_addr, guest_port, remote_addr, remote_port): the flow table's own
        #: key object (one tuple per flow, not two).
        self.key = key
        guest_addr, guest_port, remote_addr, remote_port = key
        self.guest_addr = guest_addr
        self.guest_port = guest_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.host_handle: Any = None
        self.state: TcpState = CLOSED
        self.timer_deadline: float | None = None
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self.rcv_wscale = 0
        #: Guest data the host socket did not take; the empty tuple while there is
        #: none (an empty deque costs ~760 bytes: an idle flow keeps none of them).
        self.backlog: deque[bytes] | tuple[()] = ()
        self.backlog_len = 0
        self.ooo = OutOfOrderStore(cfg.max_ooo_segments)
        self.fin_rcvd = False
        self.host_shut = False
        self.host_closed = False
        self.host_connected_flag = False
        self.iss = engine.rng.getrandbits(32)
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.snd_wnd = 0
        self.snd_wl1 = self.snd_wl2 = 0
        self.snd_wscale = 0
        self.mss = _DEFAULT_MSS
        self.max_burst = _DEFAULT_MSS
        self.cwnd = 0
        self.ssthresh = 1 << 62
        self.dupacks = 0
        self.recover = self.iss
        self.in_recovery = False
        #: Stream end positions of the data frames in flight (for the dup-ACK
        #: threshold); the empty tuple while none are (as ``backlog``).
        self.frame_ends: deque[int] | tuple[()] = ()
        self.send_queue = SendQueue()
        self.fin_queued = False
        self.fin_seq: int | None = None
        self.fin_out = False
        self.reading_paused = False
        # What the send queue may hold (and cwnd reach), and its tuning: see _tune_send_limit.
        self.snd_limit = cfg.snd_buf
        self.tune_at, self.tune_acked, self.peak_rate = now, 0, 0.0
        self.grew_at_rate = self.tune_hold = 0.0
        self.rtt = RttEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max)
        self.tlp_armed = False
        self.rto_deadline: float | None = None
        self.idle_deadline: float | None = None
        self.retries = 0
        self.probes = 0
        self.persist = False
        self.last_rx = now
        addr_sum = sum(_PAIR_WORDS[len(remote_addr)].unpack(remote_addr + guest_addr))
        #: An IPv6 flow (16-byte addresses): same engine, the IPv6 header template.
        self.v6 = len(remote_addr) == 16
        #: One's-complement sum of our IPv4 header's fixed fields (version, DF,
        #: TTL, protocol, addresses): each frame adds its length and ID.
        self.ip_header_sum = 0x4500 + 0x4000 + (64 << 8 | 6) + addr_sum
        #: The TCP pseudo-header sum without the TCP length (RFC 9293 3.1; for
        #: IPv6 RFC 8200 8.1 has the same fields, only wider: addresses, length, 6).
        self.pseudo_header_sum = addr_sum + 6
        self.ack_pending = False
        self.dirty = False
        self.syn_quote = b""
        self.half_open = False
        #: Opened toward the guest (port forwarding), not by it.
        self.inbound = False
        self.wscale_ok = False
        self.sack_ok = False
        self.sack_hole: int | None = None

    def _to(self, new: TcpState) -> None:
        """Move to state ``new``; IllegalTransition if the table in tcpstate.py forbids it."""
        # (The table looked up here, next_state() only to raise: a call fewer per
        # transition, seven per connection.)
        if new in TRANSITIONS[self.state]:
            self.state = new
        else:
            self.state = next_state(self.state, new)

    def __repr__(self) -> str:
        remote = (ipv6.addr_to_str(self.remote_addr) if self.v6
                  else ".".join(map(str, self.remote_addr)))
        return (f"TcpFlow({self.guest_port}->{remote}:"
                f"{self.remote_port} {self.state})")

    # ------------------------------------------------------------------ framing

    def _window(self) -> int:
        """The window field to advertise, updating ``rcv_adv`` (the right edge).

        The window never promises more than the flow's receive space and the
        engine's shared budget can still take: it is rounded *down* to the
        scale unit (rounding up reopened a nearly used window every round, so
        a guest sending less than a unit per round grew the backlog without
        bound), and per-chunk overhead counts against the space.
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        space = self.cfg.rcv_buf - self.backlog_len - self.ooo.nbytes
        if self.backlog_len:
            space -= len(self.backlog) * CHUNK_OVERHEAD
        engine = self.engine
        free = engine.shared_limit - engine.buffered
        if free < space:
            free = engine.room_for(self)
            if free < space:
                space = free if free > 0 else 0
                engine.starved[self] = None  # told less than it could hold: reopen later
        if space < 0:
            space = 0
        cur = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
        if cur >= SEQ_HALF:
            cur = 0
        ws = self.rcv_wscale
        if space >= cur:
            # Move the right edge right only by a useful amount (receiver SWS
            # avoidance), and do not take back what the buffer can still hold.
            half = self.cfg.rcv_buf >> 1
            if space < cur + (half if half < self.mss else self.mss):
                space = cur
            w = space >> ws
            if w > 0xFFFF:
                w = 0xFFFF
            if w << ws >= cur:
                self.rcv_adv = (self.rcv_nxt + (w << ws)) & SEQ_MASK
            return w
        # The buffer cannot take what was promised (small segments' overhead,
        # the shared budget): shrink the window rather than drop data in it.
        w = space >> ws
        self.rcv_adv = (self.rcv_nxt + (w << ws)) & SEQ_MASK
        return w

    def _xmit(self, flags: int, seq: int, parts: list[Any], plen: int,
              opts: bytes = b"") -> None:
        """Build one frame (maybe a GSO super-frame) and hand it to the link."""
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        link = self.link
        mac = link.guest_mac
        if mac is None:
            link.count("tcp.drop.tx.no_guest_mac")
            return
        thl = 20 + len(opts)
        tcp_len = thl + plen
        if flags & SYN:
            win = min(self.cfg.rcv_buf, 0xFFFF)
            self.rcv_adv = (self.rcv_nxt + win) & SEQ_MASK
        else:
            win = self._window()
        ack = self.rcv_nxt if flags & ACK else 0
        off = 12 if link.vnet_hdr else 0
        offload = link.offload
        if self.v6:
            cs = _CSUM_START6
            gso = vnet.GSO_TCPV6
            hdr = bytearray(off + _FRAME6_LEN + len(opts))
            if opts:
                hdr[off + _FRAME6_LEN:] = opts
            _FRAME6.pack_into(hdr, off, mac, link.our_mac, 0x86DD, IPV6_VERSION_WORD, tcp_len,
                              6, 64, self.remote_addr, self.guest_addr, self.remote_port,
                              self.guest_port, seq, ack, thl << 2, flags, win,
                              _fold(self.pseudo_header_sum + tcp_len) if offload else 0, 0)
        else:
            cs = _CSUM_START
            gso = vnet.GSO_TCPV4
            tot = 20 + tcp_len
            ident = link.next_ip_id()
            s = self.ip_header_sum + tot + ident
            s = (s & 0xFFFF) + (s >> 16)
            ipcs = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
            hdr = bytearray(off + _FRAME_LEN + len(opts))
            if opts:
                hdr[off + _FRAME_LEN:] = opts
            _FRAME.pack_into(hdr, off, mac, link.our_mac, 0x0800, 0x45, 0, tot, ident, 0x4000,
                             64, 6, ipcs, self.remote_addr, self.guest_addr, self.remote_port,
                             self.guest_port, seq, ack, thl << 2, flags, win,
                             _fold(self.pseudo_header_sum + tcp_len) if offload else 0, 0)
        if offload:
            if plen > self.mss:
                _VNET.pack_into(hdr, 0, vnet.F_NEEDS_CSUM, gso, cs + thl, self.mss, cs, 16, 0)
            else:
                _VNET.pack_into(hdr, 0, vnet.F_NEEDS_CSUM, 0, cs + thl, 0, cs, 16, 0)
        else:
            s = partial_sum(memoryview(hdr)[off + cs:], self.pseudo_header_sum + tcp_len)
            if plen:
                s = partial_sum(parts[0] if len(parts) == 1 else b"".join(parts), s)
            c = finish(s)
            hdr[off + cs + 16] = c >> 8
            hdr[off + cs + 17] = c & 0xFF
        if plen:
            parts.insert(0, hdr)
            link.send_frame(parts)
        else:
            link.send_frame((hdr,))

    def _xmit_fast(self, flags: int, seq: int, parts: list[Any], plen: int) -> None:
        """:meth:`_xmit` for the common segment: ``flags`` with ACK and without SYN,
        no options, a link with offloads (the kernel finishes the checksum).

        The output half of header prediction: the whole header, vnet header
        included, is one ``pack`` of the fused template (wire/frame.py), the
        checksum sums are folded inline, and the frame goes to the link's sink.
        Anything else goes to :meth:`_xmit`.
        """
        link = self.link
        mac = link.guest_mac
        if mac is None or not link.offload:
            self._xmit(flags, seq, parts, plen)
            return
        win = self._window()
        tcp_len = 20 + plen
        s = self.pseudo_header_sum + tcp_len
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        mss = self.mss
        if self.v6:
            hdr = _FAST6.pack(_FAST_VNET6[mss if plen > mss else 0], mac, link.our_mac, 0x86DD,
                              IPV6_VERSION_WORD, tcp_len, 6, 64, self.remote_addr,
                              self.guest_addr, self.remote_port, self.guest_port, seq,
                              self.rcv_nxt, 0x50, flags, win, s, 0)
        else:
            tot = 20 + tcp_len
            ident = link.next_ip_id()
            c = self.ip_header_sum + tot + ident
            c = (c & 0xFFFF) + (c >> 16)
            hdr = _FAST.pack(_FAST_VNET[mss if plen > mss else 0], mac, link.our_mac, 0x0800,
                             0x45, 0, tot, ident, 0x4000, 64, 6,
                             ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF, self.remote_addr,
                             self.guest_addr, self.remote_port, self.guest_port, seq,
                             self.rcv_nxt, 0x50, flags, win, s, 0)
        # (link.sink, not link.send_frame: the same call, one frame of Python fewer)
        if plen:
            parts.insert(0, hdr)
            link.sink(parts)
        else:
            link.sink((hdr,))

    def _send_ack(self) -> None:
        self.ack_pending = False
        if self.ooo.segments and self.sack_ok:
            blocks = self.ooo.sack_blocks(self.rcv_nxt)
            self._xmit(ACK, self.snd_nxt, [], 0, wtcp.sack_option(blocks))
        else:
            self._xmit_fast(ACK, self.snd_nxt, [], 0)

    def _send_rst(self) -> None:
        self._xmit(RST | ACK, self.snd_nxt, [], 0)

    def _send_syn(self, with_ack: bool) -> None:
        mss = self.link.mtu - (60 if self.v6 else 40)
        spec = (mss, self.rcv_wscale if self.wscale_ok or not with_ack else None,
                self.sack_ok or not with_ack)
        opts = _SYN_OPTIONS.get(spec)
        if opts is None:
            opts = _SYN_OPTIONS[spec] = wtcp.syn_options(
                mss=spec[0], wscale=spec[1], sack_permitted=spec[2])
        self._xmit(SYN | ACK if with_ack else SYN, self.iss, [], 0, opts)

    def _mark(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.engine.dirty.append(self)

    # ------------------------------------------------------------------ timers

    def _arm(self) -> None:
        """Make sure the heap wakes us no later than our earliest deadline."""
        d = self.rto_deadline
        k = self.idle_deadline
        if d is None or (k is not None and k < d):
            d = k
        if d is not None and (self.timer_deadline is None or d < self.timer_deadline):
            self.engine.timers.schedule(self, d)

    def on_timer(self, now: float) -> None:
        if self.state == CLOSED:
            return
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self.rto_deadline = None
            self._on_rto(now)
        if self.state != CLOSED and self.idle_deadline is not None and now >= self.idle_deadline:
            self.idle_deadline = None
            self._on_idle(now)
        if self.state != CLOSED:
            self._arm()

    def _on_rto(self, now: float) -> None:
        """The retransmission timer fired: resend, probe, or give up."""
        state = self.state
        if state in (SYN_RCVD, SYN_SENT):
            self._resend_syn(now)
            return
        if state not in _SND_STATES:
            return
        if self.persist:
            self._probe_zero_window(now)
            return
        if self.snd_nxt == self.snd_una and self.snd_max == self.snd_una:
            return  # nothing outstanding: stale deadline
        if self.tlp_armed:
            self._tail_loss_probe(now)
            return
        if self.snd_wnd == 0:
            # The guest closed its window on data in flight: nothing may be
            # resent, so probe it like a zero window instead of counting it dead.
            self.snd_nxt = self.snd_una
            self.fin_out = False
            self.persist = True
            self.rto_deadline = now
            self._probe_zero_window(now)
            return
        self._go_back_n(now)

    def _resend_syn(self, now: float) -> None:
        """Our SYN or SYN-ACK went unanswered: resend it, up to ``syn_retries`` times."""
        synack = self.state == SYN_RCVD
        self.retries += 1
        if self.retries > self.cfg.syn_retries:
            self.link.count("tcp.syn_timeout")
            self._abort(now, rst_guest=synack)
            return
        self.rtt.back_off()
        self._send_syn(with_ack=synack)
        self.rto_deadline = now + self.rtt.rto

    def _probe_zero_window(self, now: float) -> None:
        """Persist timer (RFC 9293 3.8.6.1): probe a closed window, up to ``max_retries``."""
        self.probes += 1
        if self.probes > self.cfg.max_retries:
            self.link.count("tcp.persist_timeout")
            self._abort(now, rst_guest=True)
            return
        self.rtt.back_off()
        self._xmit(ACK, seq_add(self.snd_una, -1), [], 0)
        self.rto_deadline = now + self.rtt.rto

    def _go_back_n(self, now: float) -> None:
        """RFC 6298 5.4-5.6 and RFC 5681 3.1: resend from snd_una with a window of one MSS."""
        self.retries += 1
        if self.retries > self.cfg.max_retries:
            self.link.count("tcp.retransmit_timeout")
            self._abort(now, rst_guest=True)
            return
        self.link.count("tcp.rto")
        flight = seq_diff(self.snd_max, self.snd_una)
        self.ssthresh = max(flight >> 1, 2 * self.mss)
        self.cwnd = self.mss
        self.rtt.back_off()
        self.rtt.discard_timed()
        self.in_recovery = False
        self.dupacks = 0
        # No tail loss probe until an ACK shows progress again.
        self.snd_nxt = self.snd_una
        self.fin_out = False
        self.rto_deadline = now + self.rtt.rto
        self._output(now)

    def _on_idle(self, now: float) -> None:
        cfg = self.cfg
        if self.state == TIME_WAIT:
            if self.host_closed:
                self.engine._remove(self)
                return
            # Compare with the deadline itself, not ``now - last_rx``: float rounding can
            # make the two disagree and re-arm the timer at ``now`` for ever.
            if now < self.last_rx + cfg.drain_timeout:
                self.idle_deadline = self.last_rx + cfg.drain_timeout
                return
            # The guest is gone and the host never took the rest: give up on it.
            self.link.count("tcp.drain_timeout")
            self.host_closed = True
            self.host.tcp_close(self, True)
            self.engine._remove(self)
            return
        if self.state not in _RCV_OPEN and self.state not in _SND_STATES:
            return
        if now < self.last_rx + cfg.keepalive_idle:  # (the deadline itself: see above)
            self.probes = 0
            self.idle_deadline = self.last_rx + cfg.keepalive_idle
            return
        if self.snd_max != self.snd_una:
            # Data in flight: the retransmission timer watches the guest.
            self.idle_deadline = now + cfg.keepalive_interval
            return
        if self.probes >= cfg.keepalive_count:
            self.link.count("tcp.keepalive_timeout")
            self._abort(now, rst_guest=True)
            return
        self.probes += 1
        self._xmit(ACK, seq_add(self.snd_una, -1), [], 0)
        self.idle_deadline = now + cfg.keepalive_interval

    # ------------------------------------------------------------------ teardown

    def _abort(self, now: float, rst_guest: bool) -> None:
        """Reset both sides and forget the flow."""
        state = self.state
        if rst_guest and state != CLOSED and state != TIME_WAIT:
            if state == CONNECTING:
                self._xmit(RST | ACK, 0, [], 0)
            elif state == SYN_SENT:
                self._xmit(RST, self.snd_nxt, [], 0)
            else:
                self._send_rst()
        if not self.host_closed:
            self.host_closed = True
            self.host.tcp_close(self, True)
        self.engine._remove(self)

    def _maybe_close_host(self) -> None:
        """Close the host socket once both directions are finished."""
        if (not self.host_closed and self.host_shut and self.fin_seq is not None
                and self.state in (TIME_WAIT, CLOSED)):
            self.host_closed = True
            self.host.tcp_close(self, False)

    def _enter_time_wait(self, now: float, from_last_ack: bool = False) -> None:
        self._to(TIME_WAIT)
        self.rto_deadline = None
        self.persist = False
        self._maybe_close_host()
        if from_last_ack and self.host_closed:
            # The guest closed first and has our FIN's ACK: nothing left to wait for.
            self.engine._remove(self)
            return
        # TIME_WAIT proper, or (after LAST_ACK) waiting for the host to take the backlog.
        self.idle_deadline = now + self.cfg.time_wait
        self._arm()
        self.engine.time_wait[self.key] = self

    # ------------------------------------------------------------------ output

    def _output(self, now: float, push: bool = True) -> None:
        """Send what the guest's window and our congestion window allow.

        ``push=False`` (while the runtime is still reading the host socket)
        holds back a tail shorter than a full frame: the next read or the
        batch's :meth:`TcpEngine.flush` sends it, so a 256 KB read does not
        end in a runt frame.
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        if self.state not in _SND_STATES:
            return
        una = self.snd_una
        queue = self.send_queue
        buffered = queue.end_pos - queue.acked_pos
        sent = ((self.snd_nxt - una) & SEQ_MASK) - self.fin_out
        wnd = self.snd_wnd if self.snd_wnd < self.cwnd else self.cwnd
        limit = buffered if buffered < wnd else wnd
        burst = self.max_burst
        xmitted = False
        while sent < limit:
            n = limit - sent
            if n > burst:
                n = burst
            elif n < self.mss and sent + n < buffered and sent:
                break  # sender SWS avoidance: wait for a full segment (Nagle-like)
            end = sent + n == buffered
            if end and not push and n < burst:
                break
            flags = ACK
            if end:
                flags = ACK | PSH
                if self.fin_queued:
                    flags = ACK | PSH | FIN
            seq = (una + sent) & SEQ_MASK
            self._xmit_fast(flags, seq, queue.slices(queue.acked_pos + sent, n), n)
            if ((seq - self.snd_max) & SEQ_MASK) < SEQ_HALF:  # new data, not a retransmission
                ends = self.frame_ends
                if not ends:
                    self.frame_ends = deque((queue.acked_pos + sent + n,))
                elif len(ends) < 4096:  # bounded even for a flight of 1-byte frames
                    ends.append(queue.acked_pos + sent + n)
                rtt = self.rtt
                if rtt.timed_seq is None:  # (time_segment() inlined: per-frame path)
                    rtt.timed_seq = (seq + n) & SEQ_MASK
                    rtt.timed_at = now
            sent += n
            self.snd_nxt = (una + sent) & SEQ_MASK
            if flags & FIN:
                self._fin_sent()
            xmitted = True
        if self.fin_queued and not self.fin_out and sent == buffered:
            # FIN with no data left to carry it.
            self._xmit_fast(ACK | FIN, self.snd_nxt, [], 0)
            self._fin_sent()
            xmitted = True
        if ((self.snd_nxt - self.snd_max) & SEQ_MASK) < SEQ_HALF:
            self.snd_max = self.snd_nxt
        if xmitted:
            self.ack_pending = False
            if self.rto_deadline is None or self.persist or self.tlp_armed:
                self.persist = False
                self._restart_timer(now)
                self._arm()
        elif (sent < buffered and self.snd_max == una and self.snd_wnd <= sent
              and not self.persist):
            # Zero window and nothing in flight: probe it (persist timer).
            self.persist = True
            self.rto_deadline = now + self.rtt.rto
            self._arm()

    def _restart_timer(self, now: float) -> None:
        """Arm the retransmission timer, preceded by a tail loss probe when possible.

        RFC 8985 7 (TLP): a Linux guest whose reader lags delays its ACK (up to
        200 ms), and the last frames of a flight may be lost with nothing after
        them to cause duplicate ACKs. A probe after two smoothed RTTs elicits an
        immediate ACK (with SACK/D-SACK) instead of waiting for the RTO.
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        srtt = self.rtt.srtt
        if (srtt is not None and not self.in_recovery
                and ((self.snd_max - self.snd_una) & SEQ_MASK) > self.mss):
            # (With one segment in flight the guest may delay its ACK by design,
            # RFC 8985 7.2: leave that to the RTO.)
            pto = 2 * srtt
            if pto < 0.01:
                pto = 0.01
            if pto < self.rtt.rto:
                self.tlp_armed = True
                self.rto_deadline = now + pto
                return
        self.tlp_armed = False
        self.rto_deadline = now + self.rtt.rto

    def _tail_loss_probe(self, now: float) -> None:
        """Resend the last in-flight segment once (RFC 8985 7.3), then wait for the RTO."""
        self.tlp_armed = False
        self.rto_deadline = now + self.rtt.rto
        flight = seq_diff(self.snd_max, self.snd_una)
        queue = self.send_queue
        data = min(flight, queue.unacked)
        if data <= 0:
            return
        self.link.count("tcp.tlp")
        n = data if data < self.mss else self.mss
        off = data - n
        flags = ACK | PSH
        if off + n == queue.unacked and self.fin_seq is not None:
            flags |= FIN
        self._xmit(flags, seq_add(self.snd_una, off), queue.slices(queue.acked_pos + off, n), n)

    def _fin_sent(self) -> None:
        self.fin_out = True
        self.fin_seq = self.snd_nxt
        self.snd_nxt = (self.snd_nxt + 1) & SEQ_MASK
        if self.state == ESTABLISHED:
            self._to(FIN_WAIT_1)
        elif self.state == CLOSE_WAIT:
            self._to(LAST_ACK)

    # ------------------------------------------------------------------ input

    def _receive(self, seg: wtcp.TcpSegment, now: float) -> None:
        """Header prediction (Van Jacobson's fast path); anything else goes to :meth:`_segment`.

        The common case: ESTABLISHED, not recovering nor resending, a segment at
        ``rcv_nxt`` with ACK (PSH) only, no options, an acceptable ACK; a pure ACK
        of new data, or in-order data with the window unchanged that fits ours,
        nothing held. :meth:`_segment`, :meth:`_ack_field`, :meth:`_acked` and
        :meth:`_deliver` without the branches that rules out: the same result
        (tests/stack/test_tcp_fastpath.py holds the two paths to that).
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        ack = seg.ack
        una = self.snd_una
        d = (ack - una) & SEQ_MASK
        if (self.state is not ESTABLISHED or seg.flags | PSH != ACK | PSH
                or seg.header_len != 20 or seg.seq != self.rcv_nxt or self.in_recovery
                or self.snd_nxt != self.snd_max or d > ((self.snd_max - una) & SEQ_MASK)):
            self._segment(seg, now)
            return
        plen = len(seg.buf) - 20
        win = seg.window << self.snd_wscale
        if plen:
            wnd = (self.rcv_adv - self.rcv_nxt) & SEQ_MASK
            if (win != self.snd_wnd or plen > wnd or wnd >= SEQ_HALF or self.backlog_len
                    or self.ooo.segments or not self.host_connected_flag):
                self._segment(seg, now)
                return
        elif not d:
            self._segment(seg, now)  # maybe a duplicate ACK
            return
        self.last_rx = now
        self.probes = 0
        if d:  # _acked() without its FIN and recovery branches (ruled out above)
            self.snd_una = ack
            self.retries = 0
            rtt = self.rtt
            if rtt.timed_seq is not None and ((ack - rtt.timed_seq) & SEQ_MASK) < SEQ_HALF:
                rtt.sample(now - rtt.timed_at)
                rtt.timed_seq = None
            queue = self.send_queue
            queue.release(d)
            engine = self.engine
            engine.buffered -= d
            ends = self.frame_ends
            while ends and ends[0] <= queue.acked_pos:
                ends.popleft()
            if not ends:
                self.frame_ends = ()  # an idle flow keeps no deque (as _acked does)
            if self.reading_paused and queue.end_pos - queue.acked_pos <= self.snd_limit >> 1:
                self._resume_reading()
            if engine.starved and engine.buffered <= engine.low_water:
                engine.release_starved()
            cwnd = self.cwnd
            cwnd += d if cwnd < self.ssthresh else self.mss * d // cwnd + 1  # RFC 5681, 3465
            self.cwnd = cwnd if cwnd < self.snd_limit else self.snd_limit
            self.dupacks = 0
            if self.snd_max == ack:
                self.rto_deadline = None
                self.tlp_armed = False
            else:
                self._restart_timer(now)
        # Window update (RFC 9293 3.10.7.4: SND.WL1/WL2 guard against old segments).
        s1 = (seg.seq - self.snd_wl1) & SEQ_MASK
        if (0 < s1 < SEQ_HALF) or (s1 == 0 and ((ack - self.snd_wl2) & SEQ_MASK) < SEQ_HALF):
            self.snd_wnd = win  # (a larger one is sent into by flush(): marked below)
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
        if plen:
            data = seg.buf[20:]
            w = self.host.tcp_write(self, data)
            if w < plen:
                self._hold(data, w)
            else:
                self.rcv_nxt = (self.rcv_nxt + plen) & SEQ_MASK
            self.ack_pending = True
        if not self.dirty:
            self.dirty = True
            self.engine.dirty.append(self)

    def _segment(self, seg: wtcp.TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.4, for every state past the handshake's first step.

        The general path: what :meth:`_receive` (header prediction) passed on.
        Acceptable ACKs, maybe with data, run inline here; rarer cases branch
        out to helpers.
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        flags = seg.flags
        state = self.state
        if state == CONNECTING:
            self._segment_connecting(seg, now)
            return
        if state == SYN_SENT:
            self._segment_syn_sent(seg, now)
            return
        seq = seg.seq
        rcv_nxt = self.rcv_nxt
        rel = (seq - rcv_nxt) & SEQ_MASK
        wnd = (self.rcv_adv - rcv_nxt) & SEQ_MASK
        if wnd >= SEQ_HALF:
            wnd = 0
        if flags & (RST | SYN):
            if flags & RST:
                self._segment_rst(rel, wnd)
            else:
                self._segment_syn(seg, now)
            return
        if not flags & ACK:
            return
        if state == SYN_RCVD and not self._handshake_acked(seg, now):
            return
        self.last_rx = now
        self.probes = 0
        hl = seg.header_len
        plen = len(seg.buf) - hl
        fin = flags & FIN
        if rel or plen > wnd:
            trimmed = self._trim_to_window(seg, now, rel, wnd, hl, plen, fin)
            if trimmed is None:
                return
            rel, hl, plen, fin = trimmed
        if not self._ack_field(seg, now, plen):
            return
        state = self.state
        if state == CLOSED or not (plen or fin):
            return
        if state not in _RCV_OPEN:
            # Data or FIN again after the guest's FIN: just ACK it.
            self._mark_ack()
            return
        if rel:
            self._ooo_insert(seq, bytes(seg.buf[hl:hl + plen]), bool(fin), plen)
            return
        if plen and not self._deliver(seg.buf[hl:hl + plen]):
            self._mark_ack()  # what was taken; the window says why not the rest
            return
        if self.ooo.segments:
            fin = self._ooo_drain() or fin
        if fin:
            self._on_fin(now)
        self._mark_ack()

    def _segment_connecting(self, seg: wtcp.TcpSegment, now: float) -> None:
        """The host connect is in progress; the guest's retransmitted SYNs wait
        for it. Anything else cannot be valid yet, except an RST that aborts
        the attempt."""
        if seg.flags & RST and seg.seq == seq_add(self.irs, 1):
            self._abort(now, rst_guest=False)

    def _segment_rst(self, rel: int, wnd: int) -> None:
        """An RST ``rel`` bytes past rcv_nxt, ``wnd`` the window we advertised."""
        state = self.state
        if state == TIME_WAIT:
            return  # RFC 1337: no TIME_WAIT assassination
        # RFC 5961 3.2: only an exact match resets; in-window gets a challenge ACK.
        if rel == 0 or (state == SYN_RCVD and rel < wnd):
            self.link.count("tcp.rst_from_guest")
            if not self.host_closed:
                self.host_closed = True
                self.host.tcp_close(self, True)
            self.engine._remove(self)
        elif rel < wnd:
            self._send_ack()

    def _segment_syn(self, seg: wtcp.TcpSegment, now: float) -> None:
        """A SYN (without RST) on a synchronized flow."""
        state = self.state
        if state == SYN_RCVD and seg.seq == self.irs:
            self._send_syn(with_ack=True)  # our SYN-ACK was lost
        elif state == TIME_WAIT and (ip := self.engine.cur_ip) is not None:
            # The guest reuses the 4-tuple: the old incarnation is over on its side.
            engine = self.engine
            if not self.host_closed:
                self.host_closed = True
                self.host.tcp_close(self, False)
            engine._remove(self)
            engine._new_syn(ip, seg, self.key, now)
        else:
            self._send_ack()  # RFC 5961 4.2 challenge ACK

    def _handshake_acked(self, seg: wtcp.TcpSegment, now: float) -> bool:
        """An ACK in SYN_RCVD: True if it acknowledges our SYN-ACK (now ESTABLISHED)."""
        if seg.ack != (self.iss + 1) & SEQ_MASK:
            self.engine.send_reset_for(seg, self.key)
            return False
        self._established(seg, now, seg.window << self.snd_wscale)
        self._mark()
        return True

    def _trim_to_window(self, seg: wtcp.TcpSegment, now: float, rel: int, wnd: int, hl: int,
                        plen: int, fin: int) -> tuple[int, int, int, int] | None:
        """Sequence acceptability (RFC 9293 3.10.7.4 first step) for a segment not
        wholly at rcv_nxt within the window: trim what lies before rcv_nxt or past
        the window, returning (rel, hl, plen, fin) of what is left, or None when
        nothing is (the ACK field is honoured even then, e.g. on a zero window).
        """
        if rel >= SEQ_HALF:
            dup = seq_diff(self.rcv_nxt, seg.seq)
            if dup >= plen + (1 if fin else 0):
                # Entirely old: a retransmission, keepalive or window probe.
                self._mark_ack()
                self._ack_field(seg, now, 0)
                return None
            hl += dup
            plen -= dup
            rel = 0
        if rel:
            if rel >= wnd:
                if plen or fin:
                    self._mark_ack()
                self._ack_field(seg, now, 0)
                return None
            if rel + plen > wnd:
                plen = wnd - rel
                fin = 0
        elif plen > wnd:
            self._mark_ack()
            plen = wnd
            fin = 0
        return rel, hl, plen, fin

    def _mark_ack(self) -> None:
        if not self.ack_pending:
            self.ack_pending = True
            self._mark()

    def _end_half_open(self) -> None:
        if self.half_open:
            self.half_open = False
            if self.inbound:
                self.engine.inbound_half_open -= 1
            else:
                self.engine.half_open -= 1

    def _established(self, seg: wtcp.TcpSegment, now: float, window: int) -> None:
        """The handshake completed (either way round): our SYN is acknowledged."""
        self._to(ESTABLISHED)
        self._end_half_open()
        self.snd_una = self.snd_nxt = self.snd_max = (self.iss + 1) & SEQ_MASK
        self.recover = self.snd_una
        self.snd_wnd = window
        self.snd_wl1 = seg.seq
        self.snd_wl2 = seg.ack
        self.retries = 0
        self.rto_deadline = None
        if self.rtt.timed_seq is not None:
            self.rtt.sample_timed(now)
        self.idle_deadline = now + self.cfg.keepalive_idle
        self._arm()

    def _ack_field(self, seg: wtcp.TcpSegment, now: float, plen: int) -> bool:
        """Process the ACK field; False if the segment is to be dropped."""
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        ack = seg.ack
        una = self.snd_una
        d = (ack - una) & SEQ_MASK
        if d >= SEQ_HALF:
            return True  # an old ACK: nothing new, keep the data
        if d > ((self.snd_max - una) & SEQ_MASK):
            self._mark_ack()  # ACKs something never sent
            return False
        win = seg.window << self.snd_wscale
        sacked = False
        if self.sack_ok and seg.header_len > 20 and (not d or self.in_recovery):
            sacked = self._read_sack(seg, ack)
        if d:
            self._acked(ack, d, now)
        elif (not plen and not seg.flags & FIN and (sacked or win == self.snd_wnd)
              and self.snd_max != una):
            # A duplicate ACK (RFC 5681 2); one carrying SACK blocks is one even
            # if the window moved, as the guest's reader keeps opening it.
            self.dupacks += 1
            # RFC 5827 early retransmit: with few frames in flight (a GSO frame
            # brings one duplicate ACK, not one per segment) fewer duplicates suffice.
            frames = len(self.frame_ends)
            if self.dupacks == (3 if frames > 3 else frames - 1 if frames > 1 else 1):
                self._fast_retransmit(now)
        # Window update (RFC 9293 3.10.7.4: SND.WL1/WL2 guard against old segments).
        s1 = (seg.seq - self.snd_wl1) & SEQ_MASK
        if (0 < s1 < SEQ_HALF) or (s1 == 0 and ((ack - self.snd_wl2) & SEQ_MASK) < SEQ_HALF):
            if win != self.snd_wnd:
                if win > self.snd_wnd:
                    self._mark()
                self.snd_wnd = win
            self.snd_wl1 = seg.seq
            self.snd_wl2 = ack
        return True

    def _acked(self, ack: int, d: int, now: float) -> None:
        """The guest acknowledged ``d`` new sequence numbers, up to ``ack``."""
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        fin_acked = self.fin_seq is not None and ack == ((self.fin_seq + 1) & SEQ_MASK)
        data = d - fin_acked
        self.snd_una = ack
        if ((ack - self.snd_nxt) & SEQ_MASK) < SEQ_HALF:
            self.snd_nxt = ack
            self.fin_out = fin_acked
        self.retries = 0
        rtt = self.rtt
        if rtt.timed_seq is not None and ((ack - rtt.timed_seq) & SEQ_MASK) < SEQ_HALF:
            # (sample_timed() inlined: per-frame path, one call fewer)
            rtt.sample(now - rtt.timed_at)
            rtt.timed_seq = None
        if data:
            queue = self.send_queue
            queue.release(data)
            engine = self.engine
            engine.buffered -= data
            ends = self.frame_ends
            while ends and ends[0] <= queue.acked_pos:
                ends.popleft()
            if not ends:
                self.frame_ends = ()  # nothing in flight: an idle flow keeps no deque
            if self.reading_paused and queue.end_pos - queue.acked_pos <= self.snd_limit >> 1:
                self._resume_reading()
            if engine.starved and engine.buffered <= engine.low_water:
                engine.release_starved()
        # Congestion control (RFC 5681 / RFC 6582).
        if self.in_recovery:
            if ((ack - self.recover) & SEQ_MASK) < SEQ_HALF:
                self.in_recovery = False
                self.cwnd = self.ssthresh
            else:
                self._retransmit_head()  # partial ACK
        elif self.cwnd < self.ssthresh:
            self.cwnd += d
        else:
            # Congestion avoidance with byte counting (RFC 3465): one ACK may
            # cover a whole GSO frame, so grow by the bytes it acknowledges.
            self.cwnd += self.mss * d // self.cwnd + 1
        if self.cwnd > self.snd_limit:
            self.cwnd = self.snd_limit
        self.dupacks = 0
        if self.snd_max == ack:
            self.rto_deadline = None
            self.tlp_armed = False
        else:
            self._restart_timer(now)
        self._mark()
        if fin_acked:
            self._our_fin_acked(now)

    def _resume_reading(self) -> None:
        """The guest's ACKs drained half the send queue: read the host socket
        again, unless the shared budget says wait (then release_starved() will)."""
        if self.engine.room_for(self) > 0:
            self.reading_paused = False
            self.host.tcp_resume_reading(self)
        else:
            self.engine.starved[self] = None

    def _tune_send_limit(self, now: float) -> bool:
        """The send queue reached its limit: look at the limit again; True if it grew.

        While the send limit holds a flow back, what is in flight is the limit, so
        the delivery rate is limit / RTT (Little's law) and the RTT is mostly the
        flow's own queueing: an RTT above what the flow's best lately seen rate
        gives at this limit (limit / best rate), i.e. a rate under half the best,
        means its ACKs come late (waiting behind a guest's flood in the TAP's
        ring), not that the flow queues more. Then the limit doubles, up to
        ``snd_buf_max`` and what the flow's share of the budget lets it hold, if
        cwnd and the guest's window are above it (so more could be in flight).
        Once the rate is back near the best, the limit halves toward ``snd_buf``:
        a longer queue costs an unloaded download (the cache) and does not raise
        its rate.
        """
        elapsed = now - self.tune_at
        srtt = self.rtt.srtt
        if srtt is None or elapsed < 4 * srtt:
            return False
        acked = self.send_queue.acked_pos
        rate = (acked - self.tune_acked) / elapsed
        self.tune_at = now
        self.tune_acked = acked
        peak = self.peak_rate * (1 - elapsed / _PEAK_MEMORY) if elapsed < _PEAK_MEMORY else 0.0
        if rate > peak:
            peak = rate
        self.peak_rate = peak
        cfg = self.cfg
        limit = self.snd_limit
        if self.grew_at_rate:  # the last growth: did it pay?
            paid = rate >= self.grew_at_rate * _GROWTH_PAYS
            self.grew_at_rate = 0.0
            if not paid:
                self.tune_hold = now + _GROWTH_HOLD
                self._shrink_send_limit()
                return False
        if rate < peak * _GROW_BELOW:
            if (limit >= cfg.snd_buf_max or self.snd_wnd <= limit or self.cwnd < limit
                    or now < self.tune_hold):
                return False
            # (Not capped at the guest's window: reading pauses at the limit and
            # resumes at half of it, so a limit at the window would let the flight
            # sag to half the window between two reads.)
            grown = min(2 * limit, cfg.snd_buf_max, self.buffered + self.engine.room_for(self))
            if grown <= limit:
                return False
            self.snd_limit = grown
            self.grew_at_rate = rate
            self.link.count("tcp.snd_limit.grown")
            return True
        if rate > peak * _SHRINK_ABOVE and limit > cfg.snd_buf:
            self._shrink_send_limit()
        return False

    def _shrink_send_limit(self) -> None:
        """Halve the send limit, not below ``snd_buf`` (nor cwnd above it)."""
        limit = self.snd_limit >> 1
        self.snd_limit = limit = limit if limit > self.cfg.snd_buf else self.cfg.snd_buf
        if self.cwnd > limit:
            self.cwnd = limit
        self.link.count("tcp.snd_limit.shrunk")

    def _our_fin_acked(self, now: float) -> None:
        state = self.state
        if state == FIN_WAIT_1:
            self._to(FIN_WAIT_2)
            self._maybe_close_host()
        elif state == CLOSING:
            self._enter_time_wait(now)
        elif state == LAST_ACK:
            self._enter_time_wait(now, from_last_ack=True)

    def _read_sack(self, seg: wtcp.TcpSegment, ack: int) -> bool:
        """Note where the first hole above ``ack`` ends; True if a block lies above it.

        A block at or below ``ack`` is a D-SACK (RFC 2883): the guest got
        something twice (e.g. a tail loss probe), which signals no loss.
        """
        try:
            blocks = seg.options().sack
        except MalformedPacket:
            return False
        hole = None
        span = seq_diff(self.snd_max, ack)
        for left, _right in blocks:
            rel = seq_diff(left, ack)
            if 0 < rel <= span and (hole is None or rel < hole):
                hole = rel
        if hole is None:
            self.sack_hole = None
            return False
        self.sack_hole = seq_add(ack, hole)
        return True

    def _fast_retransmit(self, now: float) -> None:
        if self.in_recovery:
            return
        self.link.count("tcp.fast_retransmit")
        flight = seq_diff(self.snd_max, self.snd_una)
        self.ssthresh = max(flight >> 1, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.recover = self.snd_max
        self.in_recovery = True
        self.rtt.discard_timed()
        self._retransmit_head()
        self.rto_deadline = now + self.rtt.rto

    def _retransmit_head(self) -> None:
        """Resend the first frame's worth at snd_una (fast retransmit, partial ACK).

        With offloads a lost frame is a whole GSO super-frame, so up to a burst is resent.
        """
        queue = self.send_queue
        buffered = queue.unacked
        n = min(self.max_burst, buffered, seq_diff(self.snd_max, self.snd_una))
        if self.sack_hole is not None:
            # Resend only the hole the guest's SACK blocks point at.
            hole = seq_diff(self.sack_hole, self.snd_una)
            if 0 < hole < n:
                n = hole
            self.sack_hole = None
        if n > 0:
            flags = ACK | PSH if n == buffered else ACK
            if n == buffered and self.fin_seq is not None:
                flags |= FIN
            self._xmit(flags, self.snd_una, queue.slices(queue.acked_pos, n), n)
        elif self.fin_seq is not None:
            self._xmit(ACK | FIN, self.snd_una, [], 0)

    def _deliver(self, data: memoryview) -> bool:
        """In-order data to the host: write directly, keep what it did not take.

        False if part of it was refused (neither written nor buffered, so not
        acknowledged: the guest sends it again).
        """
        # Per-frame path: sequence arithmetic inline, not via seq.py (a call each).
        n = len(data)
        if self.backlog_len or not self.host_connected_flag:
            return self._hold(data, 0)
        w = self.host.tcp_write(self, data)
        if w < n:
            return self._hold(data, w)
        self.rcv_nxt = (self.rcv_nxt + n) & SEQ_MASK
        return True

    def _hold(self, data: memoryview, written: int) -> bool:
        """Keep ``data[written:]`` in the backlog as far as the flow's receive space
        and the engine's budget can take it (each chunk costing CHUNK_OVERHEAD too);
        refuse the rest (returning False)."""
        rest = len(data) - written
        rcv_buf = self.cfg.rcv_buf
        engine = self.engine
        # (The slack lets in the overhead of the segments of one full window.)
        room = (rcv_buf + (rcv_buf >> 4) - self.backlog_len - self.ooo.nbytes
                - (len(self.backlog) + 1) * CHUNK_OVERHEAD)
        free = engine.room_for(self) - CHUNK_OVERHEAD
        take = rest
        if room < take or free < take:
            # Only a guest that sends past the window we advertise, or many tiny
            # segments into a window advertised before they arrived, gets here.
            take = max(0, min(room, free))
            self.link.count("tcp.drop.rcv_buf" if room < free else "tcp.drop.max_buffered")
            if room >= free:
                engine.starved[self] = None
        if take:
            backlog = self.backlog
            if backlog:
                backlog.append(bytes(data[written:written + take]))
            else:
                self.backlog = deque((bytes(data[written:written + take]),))
            self.backlog_len += take
            engine.buffered += take + CHUNK_OVERHEAD
        self.rcv_nxt = seq_add(self.rcv_nxt, written + take)
        return take == rest

    def _ooo_insert(self, seq: int, data: bytes, fin: bool, plen: int) -> None:
        """Hold a segment that arrived past rcv_nxt, within the segment cap and budget."""
        self.link.count("tcp.rx_out_of_order")
        ooo = self.ooo
        held = ooo.held_len(seq)
        engine = self.engine
        if held is None:
            if ooo.is_full():
                self.link.count("tcp.drop.ooo_full")
            elif plen + CHUNK_OVERHEAD > engine.room_for(self):
                self.link.count("tcp.drop.max_buffered")
                engine.starved[self] = None
            else:
                ooo.add(seq, data, fin)
                engine.buffered += plen + CHUNK_OVERHEAD
        elif held < plen and plen - held <= engine.room_for(self):
            engine.buffered += ooo.replace(seq, data, fin)
        # Immediate duplicate ACK (RFC 5681 4.2), not coalesced.
        self._send_ack()

    def _ooo_drain(self) -> bool:
        """Deliver held segments that are now in order; True if a FIN was reached."""
        ooo = self.ooo
        while ooo.segments:
            progressed = False
            for seq in ooo.order_from(self.rcv_nxt):
                if seq_lt(self.rcv_nxt, seq):
                    break
                data, fin = ooo.pop(seq)
                self.engine.buffered -= len(data) + CHUNK_OVERHEAD
                skip = seq_diff(self.rcv_nxt, seq)
                if skip < len(data):
                    if not self._deliver(memoryview(data)[skip:]):
                        return False  # refused: the guest resends from rcv_nxt
                    if fin:
                        self._ooo_clear()
                        return True
                elif skip == len(data) and fin:
                    self._ooo_clear()
                    return True
                progressed = True
            if not progressed:
                break
        return False

    def _ooo_clear(self) -> None:
        self.engine.buffered -= self.ooo.nbytes + len(self.ooo.segments) * CHUNK_OVERHEAD
        self.ooo.clear()

    def _on_fin(self, now: float) -> None:
        self.rcv_nxt = (self.rcv_nxt + 1) & SEQ_MASK
        self.fin_rcvd = True
        state = self.state
        if state == ESTABLISHED:
            self._to(CLOSE_WAIT)
        elif state == FIN_WAIT_1:
            self._to(CLOSING)
        elif state == FIN_WAIT_2:
            self._enter_time_wait(now)
        if not self.backlog_len and self.host_connected_flag and not self.host_shut:
            self.host_shut = True
            self.host.tcp_shutdown_write(self)
            self._maybe_close_host()

    def _segment_syn_sent(self, seg: wtcp.TcpSegment, now: float) -> None:
        """Our SYN toward the guest is out (RFC 9293 3.10.7.3)."""
        flags = seg.flags
        if flags & ACK and seg.ack != seq_add(self.iss, 1):
            if not flags & RST:
                self.engine.send_reset_for(seg, self.key)
            return
        if flags & RST:
            if flags & ACK:
                self.link.count("tcp.refused_by_guest")
                self._abort(now, rst_guest=False)
            return
        if not flags & SYN:
            return
        self.last_rx = now
        self.irs = seg.seq
        self.rcv_nxt = self.rcv_adv = seq_add(seg.seq, 1)
        self._apply_syn_options(seg)
        if not flags & ACK:
            return  # simultaneous open is not something a guest does to a NAT
        self._established(seg, now, seg.window)  # a SYN's window is never scaled
        self._send_ack()
        self.host.tcp_resume_reading(self)
        self._output(now)

    def _apply_syn_options(self, seg: wtcp.TcpSegment) -> None:
        try:
            opts = seg.options()
        except MalformedPacket:
            opts = wtcp.TcpOptions()
        our_mss = self.link.mtu - (60 if self.v6 else 40)  # IP + TCP headers
        mss = opts.mss if opts.mss else _DEFAULT_MSS
        self.mss = max(64, min(mss, our_mss))
        if self.link.offload:
            self.max_burst = max(self.mss, (min(_MAX_IP_PAYLOAD - 60, 65535) // self.mss)
                                 * self.mss)
        else:
            self.max_burst = self.mss
        self.sack_ok = opts.sack_permitted
        if opts.wscale is not None:
            self.wscale_ok = True
            self.snd_wscale = opts.wscale
            self.rcv_wscale = self.engine.our_wscale
        else:
            self.wscale_ok = False
            self.snd_wscale = 0
            self.rcv_wscale = 0
        self.cwnd = 10 * self.mss  # RFC 6928 initial window

    # ------------------------------------------------------------------ runtime entry points

    def host_connected(self, now: float) -> None:
        """The host socket connected: answer the guest's SYN."""
        if self.state != CONNECTING:
            return
        self.host_connected_flag = True
        self.syn_quote = b""  # only a failed connect quotes the SYN
        self._to(SYN_RCVD)
        self.engine.known_peers.add((self.remote_addr, self.remote_port))
        self.retries = 0
        self._send_syn(with_ack=True)
        self.rtt.time_segment(self.iss, now)
        self.rto_deadline = now + self.rtt.rto
        self._arm()

    def host_connect_failed(self, errno_value: int, now: float) -> None:
        """The host connect failed: RST (refused) or ICMP unreachable to the guest.

        The runtime has released its socket; the engine makes no more host calls.
        """
        if self.state != CONNECTING:
            return
        self.host_closed = True
        code = _ICMP_FOR_ERRNO.get(errno_value)
        if code is None:
            self.link.count("tcp.connect_refused")
            self._xmit(RST | ACK, 0, [], 0)
        else:
            self.link.count("tcp.connect_unreachable")
            _unreachable(self.engine, self.guest_addr, code, self.syn_quote)
        self.engine._remove(self)

    def host_writable(self, now: float) -> None:
        """The host socket accepts data again: drain the backlog, reopen the window."""
        if self.host_closed or not self.host_connected_flag:
            return
        backlog = self.backlog
        before = self.backlog_len
        chunks = len(backlog)
        while backlog:
            chunk = backlog[0]
            w = self.host.tcp_write(self, chunk)
            if w < len(chunk):
                if w:
                    backlog[0] = chunk[w:]
                    self.backlog_len -= w
                break
            backlog.popleft()
            self.backlog_len -= w
        if not backlog:
            self.backlog = ()  # drained: an idle flow keeps no deque
        engine = self.engine
        engine.buffered -= before - self.backlog_len + (chunks - len(backlog)) * CHUNK_OVERHEAD
        if engine.starved and engine.buffered <= engine.low_water:
            engine.release_starved()
        if not backlog and self.fin_rcvd and not self.host_shut:
            self.host_shut = True
            self.host.tcp_shutdown_write(self)
            self._maybe_close_host()
            if self.host_closed and self.state == TIME_WAIT:
                self.idle_deadline = now + self.cfg.time_wait
                self._arm()
                return
        if self.backlog_len < before and self.state in _RCV_OPEN:
            # Tell the guest about the reopened window without waiting for a batch.
            cur = seq_diff(self.rcv_adv, self.rcv_nxt)
            if self._space() >= cur + min(self.cfg.rcv_buf >> 1, 2 * self.mss):
                self._send_ack()

    def _space(self) -> int:
        """What the window could offer now (see :meth:`_window`)."""
        space = (self.cfg.rcv_buf - self.backlog_len - self.ooo.nbytes
                 - len(self.backlog) * CHUNK_OVERHEAD)
        return min(space, self.engine.room_for(self))

    def host_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Bytes read from the host socket (at most ``host_read_budget()``).

        ``bytes`` are kept by reference until the guest acknowledges them (and
        handed to the link as slices); any other buffer is copied first. Full
        frames go out at once; a shorter tail waits for the next read or for
        :meth:`TcpEngine.flush`, which the runtime calls after its read loop.
        """
        if self.state not in _SND_STATES and self.state not in _HALF_OPEN or self.fin_queued:
            return
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        queue = self.send_queue
        queued_before = queue.end_pos
        queue.append(data)
        n = queue.end_pos - queued_before  # (not len(data): one call fewer per frame)
        engine = self.engine
        engine.buffered += n
        if not self.reading_paused:
            if queue.end_pos - queue.acked_pos >= self.snd_limit and (
                    now - self.tune_at < _TUNE_INTERVAL or not self._tune_send_limit(now)):
                self.reading_paused = True
                self.host.tcp_pause_reading(self)
            elif engine.buffered >= engine.shared_limit and engine.room_for(self) <= 0:
                self.reading_paused = True
                self.host.tcp_pause_reading(self)
                engine.starved[self] = None
        # An unsent tail shorter than a frame, within both windows, waits for flush():
        # what _output(push=False) would decide, without the call.
        buffered = queue.end_pos - queue.acked_pos
        unsent = buffered - ((self.snd_nxt - self.snd_una) & SEQ_MASK) + self.fin_out
        if unsent >= self.max_burst or buffered > self.snd_wnd or buffered > self.cwnd:
            self._output(now, push=False)
        self._mark()  # flush() sends the tail

    def host_eof(self, now: float) -> None:
        """The host peer closed its sending side: FIN to the guest after the data."""
        if self.fin_queued or self.host_closed:
            return
        self.fin_queued = True
        self._output(now)

    def host_error(self, errno_value: int, now: float) -> None:
        """The host socket failed (reset, error): reset the guest connection."""
        if self.state == CLOSED:
            return
        self.link.count("tcp.host_error")
        self._abort(now, rst_guest=True)

    def host_read_budget(self) -> int:
        """How many bytes the runtime may pass to the next ``host_data``."""
        if self.fin_queued or self.state == CLOSED:
            return 0
        room = self.snd_limit - self.send_queue.unacked
        engine = self.engine
        if engine.shared_limit - engine.buffered < room:
            free = engine.room_for(self)
            if free < room:
                # The shared budget is what stops this read: the runtime stops
                # reading at 0, and release_starved() resumes it.
                room = free
                if room <= 0:
                    self.reading_paused = True
                    engine.starved[self] = None
        return room if room > 0 else 0

    @property
    def send_queue_len(self) -> int:
        """Bytes from the host not yet acknowledged by the guest."""
        return self.send_queue.unacked

    @property
    def ooo_len(self) -> int:
        """Payload bytes held out of order (waiting for a gap to fill)."""
        return self.ooo.nbytes

    @property
    def buffered(self) -> int:
        """What this flow charges to the engine's shared budget (payload + overhead)."""
        queue = self.send_queue
        return (queue.end_pos - queue.acked_pos + self.backlog_len + self.ooo.nbytes
                + (len(self.backlog) + len(self.ooo.segments)) * CHUNK_OVERHEAD)

    def _budget_freed(self) -> None:
        """The shared budget has room again: resume what it held back."""
        if self.state == CLOSED:
            return
        if (self.reading_paused and not self.fin_queued
                and self.send_queue.unacked <= self.snd_limit >> 1):
            self.reading_paused = False
            self.host.tcp_resume_reading(self)
        if self.state in _RCV_OPEN:
            cur = seq_window(self.rcv_adv, self.rcv_nxt)
            if self._space() >= cur + min(self.cfg.rcv_buf >> 1, 2 * self.mss):
                self._send_ack()  # the window update the guest's persist timer waits for


class TcpEngine:
    """All TCP flows of one stack; see the module docstring.

    The stack calls :meth:`handle` for every TCP/IPv4 packet from the guest,
    :meth:`flush` after each batch of frames or host events (coalesced ACKs
    and the output they unblock go out there), and :meth:`close_all` at
    shutdown. ``policy(dst_ip, dst_port)`` maps a destination to the host
    targets to connect to, or None to refuse it (ICMP net-unreachable).
    Counters go to ``link.count`` under ``tcp.*``.
    """

    def __init__(self, config: NetConfig, link: Link, host: HostPort, timers: Timers,
                 policy: Policy, tcp_config: TcpConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        #: The network's broadcast address (a property of the config that computes it).
        self._broadcast = config.broadcast
        self.link = link
        self.host = host
        self.timers = timers
        self.policy = policy
        self.cfg = tcp_config or TcpConfig()
        ws = 0
        while (self.cfg.rcv_buf >> ws) > 0xFFFF and ws < wtcp.MAX_WSCALE:
            ws += 1
        #: The window scale we offer: the smallest that can express rcv_buf.
        self.our_wscale = ws
        self.rng = rng or random.Random()
        self.flows: dict[tuple[bytes, int, bytes, int], TcpFlow] = {}
        #: Guest-initiated flows in a half-open state.
        self.half_open = 0
        #: Flows opened toward the guest (port forwarding), all and half-open: they
        #: have limits of their own, so they cannot use up the guest's.
        self.inbound = 0
        self.inbound_half_open = 0
        #: Bytes all flows hold (send queues, backlogs, out-of-order data, with
        #: CHUNK_OVERHEAD per held segment), kept below ``max_buffered``.
        self.buffered = 0
        self.max_buffered = config.max_buffered
        #: Up to this total anyone may take what is left (no per-flow checks on the
        #: per-frame path); past it each flow may grow to its share (room_for).
        #: It is what one flow alone may hold.
        self.shared_limit = self.max_buffered // BUDGET_SHARES
        #: Held-back flows are looked at again (release_starved) once buffered falls
        #: to this mark: far below the budget by default, and ``wake_step`` below
        #: the total at which a flow was held back by the budget as a whole.
        self.default_low_water = self.max_buffered >> 2
        self.wake_step = self.max_buffered >> 6
        self.low_water = self.default_low_water
        #: Flows the budget held back (reading paused, window shrunk, data refused).
        self.starved: dict[TcpFlow, None] = {}
        self.dirty: list[TcpFlow] = []
        #: Flows in TIME_WAIT, oldest first.
        self.time_wait: dict[tuple[bytes, int, bytes, int], TcpFlow] = {}
        #: The packet being handled (a SYN replacing a TIME_WAIT flow quotes it).
        self.cur_ip: IpPacket | None = None
        #: New guest flows per second (NetConfig.new_flow_rate/burst), and the
        #: (address, port) destinations that lately accepted one: SYNs to those pass.
        self.new_flows = TokenBucket(config.new_flow_rate, config.new_flow_burst)
        self.known_peers = KnownPeers()
        #: Until when the admission bucket has no token: till then the stack offers
        #: each frame to shed_syn() before it parses it (a SYN flood's frames).
        self.syn_shed_until = 0.0
        #: What the device drops unread while the guest floods SYNs (review_flood).
        self.syn_flood_filter: SynFloodFilter | None = None
        self.syn_flood_watch = FloodWatch(config.new_flow_rate)
        #: Destinations of the IPv4 SYNs refused since the last review.
        self._syn_flooded: dict[bytes, None] = {}
        #: SYNs admitted with a token so far (with the refusals: what a filter samples).
        self._syns_admitted = 0

    def handle(self, ip: Ipv4Packet, now: float, checksum_verified: bool) -> None:
        """One TCP/IPv4 packet from the guest (its buffer is not kept after return).

        ``checksum_verified``: the link vouched for the TCP checksum (vnet
        NEEDS_CSUM/DATA_VALID), so it is not summed here.
        """
        if ip.flags_frag & 0x3FFF:  # MF or a fragment offset: the stack reassembles
            self.link.count("tcp.drop.fragment")
            return
        try:
            seg = wtcp.TcpSegment(ip.payload, ip.src, ip.dst, not checksum_verified)
        except MalformedPacket:
            self.link.count("tcp.drop.malformed")
            return
        key = (ip.src, seg.src_port, ip.dst, seg.dst_port)
        flow = self.flows.get(key)
        if flow is not None:
            self.cur_ip = ip
            flow._receive(seg, now)
            self.cur_ip = None  # the runtime reuses the frame's buffer
            return
        if seg.flags & (SYN | ACK | RST) == SYN:
            self._new_syn(ip, seg, key, now)
        elif not seg.flags & RST:
            self.link.count("tcp.rst_unknown_flow")
            self.send_reset_for(seg, key)

    def handle6(self, ip: Ipv6Packet, now: float, checksum_verified: bool) -> None:
        """One TCP/IPv6 packet from the guest: as :meth:`handle` (the same flows and
        state machine; the 16-byte addresses keep the keys apart from IPv4's)."""
        payload = ip.payload
        if not checksum_verified and partial_sum(payload, ipv6.pseudo_header_sum(
                ip.src, ip.dst, wtcp.PROTO, len(payload))) != 0:
            self.link.count("tcp.drop.malformed")
            return
        try:
            seg = wtcp.TcpSegment(payload)
        except MalformedPacket:
            self.link.count("tcp.drop.malformed")
            return
        key = (ip.src, seg.src_port, ip.dst, seg.dst_port)
        flow = self.flows.get(key)
        if flow is not None:
            self.cur_ip = ip
            flow._receive(seg, now)
            self.cur_ip = None  # the runtime reuses the frame's buffer
            return
        if seg.flags & (SYN | ACK | RST) == SYN:
            self._new_syn(ip, seg, key, now)
        elif not seg.flags & RST:
            self.link.count("tcp.rst_unknown_flow")
            self.send_reset_for(seg, key)

    def _bad_destination(self, dst: bytes) -> bool:
        """Multicast, broadcast or unspecified: no connection goes there (IPv6: the
        address policy refuses the rest of what no host may see)."""
        if len(dst) == 16:
            return dst[0] == 0xFF or dst == _UNSPECIFIED6
        return dst[0] >= 224 or dst == self._broadcast or dst == b"\0\0\0\0"

    def _new_syn(self, ip: IpPacket, seg: wtcp.TcpSegment,
                 key: tuple[bytes, int, bytes, int], now: float) -> None:
        link = self.link
        if self._bad_destination(ip.dst):
            link.count("tcp.drop.bad_destination")
            return
        cfg = self.cfg
        if len(self.flows) - self.inbound >= cfg.max_flows and not self._evict_time_wait(False):
            link.count("tcp.drop.max_flows")
            return
        if self.half_open >= cfg.max_half_open:
            link.count("tcp.drop.max_half_open")
            return
        # Admission (admission.py): before any host syscall, so a flood costs little.
        if (ip.dst, seg.dst_port) not in self.known_peers:
            if not self.new_flows.take(now):
                link.count("tcp.drop.new_flow_rate")
                bucket = self.new_flows
                # (At least past ``now``: at a refusal the bucket refuses every take
                # at that time, however close to 1 its tokens are.)
                self.syn_shed_until = max(now + (1.0 - bucket.tokens) / bucket.rate,
                                          math.nextafter(now, math.inf))
                if len(ip.dst) == 4:
                    self._syn_flooded[ip.dst] = None
                return
            self._syns_admitted += 1
        targets = self.policy(ip.dst, seg.dst_port)
        if targets is None:
            link.count("tcp.policy_refused")
            _unreachable(self, ip.src, icmp.NET_UNREACH, ip.buf)
            return
        flow = TcpFlow(self, key, now)
        flow._to(CONNECTING)
        flow.irs = seg.seq
        flow.rcv_nxt = flow.rcv_adv = (seg.seq + 1) & SEQ_MASK
        l4 = ip.upper_offset if isinstance(ip, Ipv6Packet) else ip.header_len  # _l4_offset
        flow.syn_quote = bytes(ip.buf[:l4 + 8])
        flow._apply_syn_options(seg)
        flow.snd_wnd = seg.window
        flow.half_open = True
        self.half_open += 1
        self.flows[key] = flow
        link.count("tcp.flows_opened")
        self.host.tcp_connect(flow, targets)

    def shed_syn(self, frame: memoryview, trusted: bool, guest_ip: bytes | None) -> bool:
        """True if ``frame`` (an Ethernet frame from the guest) is a SYN that
        :meth:`_new_syn` would refuse for want of an admission token; counted as
        it counts it. The stack asks only before :attr:`syn_shed_until`, so under a
        SYN flood the refused SYNs cost a few byte reads and the IP header's sum,
        not the parse of three headers. Anything else is left to :meth:`handle`,
        which may count or act otherwise: not plain IPv4/TCP from ``guest_ip``
        and the guest's MAC, a TCP checksum the link did not vouch for
        (``trusted``), a bad header, a fragment, IP options, a known flow or
        destination, a bad destination, a full table (which may evict a
        TIME_WAIT flow).
        """
        if not trusted or len(frame) < 54:
            return False
        h = bytes(frame[:54])  # one copy: indexing bytes is cheaper than a memoryview
        if (h[12] != 8 or h[13] != 0 or h[14] != 0x45 or h[23] != 6 or h[20] & 0x3F or h[21]
                or h[47] & (SYN | ACK | RST) != SYN):
            return False
        total = h[16] << 8 | h[17]
        if (total > len(frame) - 14 or not 20 <= (h[46] >> 4) << 2 <= total - 20
                or partial_sum(h[14:34]) != 0):
            return False
        src = h[26:30]
        if src != guest_ip or h[6:12] != self.link.guest_mac:
            return False
        dst = h[30:34]
        dport = h[36] << 8 | h[37]
        if self._bad_destination(dst) or (dst, dport) in self.known_peers:
            return False
        cfg = self.cfg
        if (len(self.flows) - self.inbound >= cfg.max_flows or self.half_open >= cfg.max_half_open
                or (src, h[34] << 8 | h[35], dst, dport) in self.flows):
            return False
        self.link.count("tcp.drop.new_flow_rate")
        self._syn_flooded[dst] = None
        return True

    def review_flood(self, now: float, guest_ip: bytes | None) -> bool:
        """Decide :attr:`syn_flood_filter` from the SYNs asked to open a flow (refused
        or admitted) since the last review; True if it changed. As
        :meth:`pyslirp.stack.udp.UdpEngine.review_flood` (and reviewed with it): the
        filter samples the plain SYNs from ``guest_ip`` (IPv4) to the destinations
        refused in the last window (``SYN_FLOOD_DESTINATIONS`` of them), sparing the
        known peers there, which pass without a token; the SYNs never read are
        counted as the estimate ``tcp.drop.syn_flood_filtered``. A retransmitted SYN
        of a flow still opening is sampled too (the flow's own SYN-ACK retransmits
        cover it)."""
        seen = self.link.counters.get("tcp.drop.new_flow_rate", 0) + self._syns_admitted
        flooded = list(self._syn_flooded)[-SYN_FLOOD_DESTINATIONS:]
        self._syn_flooded.clear()
        destinations: list[bytes] = []
        spared: list[tuple[bytes, int]] = []
        for dst in sorted(flooded):
            ports = self.known_peers.ports_of(dst)
            if len(spared) + len(ports) <= SYN_FLOOD_SPARED:
                destinations.append(dst)
                spared += ((dst, port) for port in sorted(ports))
        coverable = bool(destinations) and guest_ip is not None and len(guest_ip) == 4
        unread = self.syn_flood_watch.review(now, seen, coverable)
        if unread:
            self.link.count("tcp.drop.syn_flood_filtered", unread)
        keep = self.syn_flood_watch.keep
        wanted = None
        if keep is not None and guest_ip is not None:
            wanted = SynFloodFilter(guest_ip, tuple(destinations), tuple(spared), keep)
        if wanted == self.syn_flood_filter:
            return False
        if self.syn_flood_filter is None:
            self.link.count("tcp.syn_flood_filter.engaged")
        self.syn_flood_filter = wanted
        return True

    def _evict_time_wait(self, inbound: bool) -> bool:
        """Free a table slot held by the oldest TIME_WAIT flow (of the direction
        ``inbound`` says) whose host side is done.

        TIME_WAIT only re-ACKs a lost final FIN; a new connection matters more
        (the kernel's tcp_tw_reuse makes the same trade).
        """
        for flow in self.time_wait.values():  # insertion order: oldest first
            if flow.host_closed and flow.inbound == inbound:
                break
        else:
            return False
        self.link.count("tcp.time_wait_evicted")
        self._remove(flow)
        return True

    def open_to_guest(self, remote_addr: bytes, remote_port: int, guest_addr: bytes,
                      guest_port: int, now: float, host_handle: Any = None) -> TcpFlow | None:
        """Active open toward the guest (port forwarding): send a SYN.

        The host socket is already connected. The engine calls
        ``host.tcp_resume_reading(flow)`` once the guest accepted; the runtime
        should not read the host socket before that. If the guest refuses or
        never answers, ``host.tcp_close(flow, True)`` follows. Returns None when
        the 4-tuple is in use or the inbound limits (``max_inbound_flows``,
        ``max_inbound_half_open``) are reached; the guest's own flows do not
        count toward those, nor these toward the guest's.
        """
        key = (guest_addr, guest_port, remote_addr, remote_port)
        cfg = self.cfg
        if key in self.flows:
            self.link.count("tcp.drop.open_to_guest")
            return None
        if self.inbound >= cfg.max_inbound_flows and not self._evict_time_wait(True):
            self.link.count("tcp.drop.inbound_max_flows")
            return None
        if self.inbound_half_open >= cfg.max_inbound_half_open:
            self.link.count("tcp.drop.inbound_max_half_open")
            return None
        flow = TcpFlow(self, key, now)
        flow.host_handle = host_handle
        flow.host_connected_flag = True
        flow._to(SYN_SENT)
        flow.inbound = True
        flow.half_open = True
        self.inbound += 1
        self.inbound_half_open += 1
        flow.rcv_wscale = self.our_wscale
        self.flows[key] = flow
        flow._send_syn(with_ack=False)
        flow.snd_nxt = flow.snd_max = seq_add(flow.iss, 1)
        flow.rtt.time_segment(flow.iss, now)
        flow.rto_deadline = now + flow.rtt.rto
        flow._arm()
        return flow

    def send_reset_for(self, seg: wtcp.TcpSegment, key: tuple[bytes, int, bytes, int]) -> None:
        """RFC 9293 3.10.7.1: answer a segment that belongs to no connection."""
        if seg.flags & ACK:
            seq, ack, flags = seg.ack, 0, RST
        else:
            seq, ack, flags = 0, seq_add(seg.seq, seg.seq_len), RST | ACK
        guest_addr, guest_port, remote_addr, remote_port = key
        if len(guest_addr) == 16:
            rst = bytearray(wtcp.HEADER_LEN)
            wtcp.build_header(rst, 0, remote_port, guest_port, seq, ack, flags, 0)
            c = finish(partial_sum(rst, ipv6.pseudo_header_sum(remote_addr, guest_addr,
                                                               wtcp.PROTO, len(rst))))
            rst[16], rst[17] = c >> 8, c & 0xFF
            self.link.send_ipv6(remote_addr, guest_addr, wtcp.PROTO, rst)
            return
        self.link.send_ipv4(remote_addr, guest_addr, wtcp.PROTO,
                            wtcp.build(remote_addr, guest_addr, remote_port, guest_port, seq,
                                       ack, flags, 0))

    def flush(self, now: float) -> None:
        """End of a batch: send coalesced ACKs and the data the batch's ACKs allow."""
        dirty = self.dirty
        if not dirty:
            return
        self.dirty = []
        for flow in dirty:
            flow.dirty = False
            if flow.state == CLOSED:
                continue
            # _output() only when it has something to send: unsent data or a FIN.
            queue = flow.send_queue
            if (queue.end_pos - queue.acked_pos
                    != ((flow.snd_nxt - flow.snd_una) & SEQ_MASK) - flow.fin_out
                    or flow.fin_queued and not flow.fin_out):
                flow._output(now)
            if flow.ack_pending:
                flow._send_ack()

    def _remove(self, flow: TcpFlow) -> None:
        key = flow.key
        if self.flows.get(key) is flow:
            del self.flows[key]
            if flow.inbound:
                self.inbound -= 1
        if self.time_wait.get(key) is flow:
            del self.time_wait[key]
        # Once per connection: each step is skipped when there is nothing to undo (a
        # flow that ran its course holds no data, no timer entry and no starved mark).
        if flow.half_open:
            flow._end_half_open()
        flow._to(CLOSED)
        flow.rto_deadline = flow.idle_deadline = None
        if flow.timer_deadline is not None:
            self.timers.cancel(flow)
        if flow.send_queue.chunks or flow.backlog or flow.ooo.segments:
            self.buffered -= flow.buffered
            flow.send_queue.clear()
            flow.backlog = ()
            flow.backlog_len = 0
            flow.ooo.clear()
        starved = self.starved
        if starved:
            starved.pop(flow, None)
            if starved and self.buffered <= self.low_water:
                self.release_starved()

    def room_for(self, flow: TcpFlow) -> int:
        """How many more bytes ``flow`` may buffer under the shared budget.

        The budget is cut into ``max(flows + R, S)`` equal shares (R =
        ``BUDGET_RESERVE``, S = ``BUDGET_SHARES``; flows that are connected:
        half-open and TIME_WAIT ones hold nothing): each flow may grow to one
        share, and all together must leave R shares free. So stalled flows
        cannot starve the others and all together stay within ``max_buffered``.
        A flow that opens while stalled ones hold all they may still finds room:
        up to S - R flows, a whole share (the shares do not shrink, so no flow
        can take more while there are few); past that, before it came the others
        left ``R * budget / (flows - 1 + R)`` free, now they need to leave only
        ``R * budget / (flows + R)``, and the difference is its room at least. A
        flow over its share (one that grew while there were fewer) keeps what it
        holds, since that was acknowledged or read, but gets no more until it is
        back under it: its window shrinks by not reopening. Below
        ``shared_limit`` (one share) in total nobody is checked.
        """
        buffered = self.buffered
        # Half-open and TIME_WAIT flows hold (next to) nothing: a SYN flood or many
        # short connections must not shrink the shares.
        shares = (len(self.flows) - self.half_open - self.inbound_half_open
                  - len(self.time_wait) + BUDGET_RESERVE)
        share = self.max_buffered // (shares if shares > BUDGET_SHARES else BUDGET_SHARES)
        hard = self.max_buffered - BUDGET_RESERVE * share - buffered
        room = self.shared_limit - buffered
        own = share - flow.buffered
        if own > room:
            room = own
        if hard < room:
            if hard <= 0 and self.low_water < buffered - self.wake_step:
                # Held back by the total, not by its own share: look again once
                # others have freed a step's worth (release_starved).
                self.low_water = buffered - self.wake_step
            return hard
        return room

    def release_starved(self) -> None:
        """The budget has room again (buffered fell to ``low_water``): resume the
        held-back flows that now have room of their own; the others stay held
        back, and are looked at again once another ``wake_step`` is freed."""
        self.low_water = min(self.default_low_water, self.buffered - self.wake_step)
        for flow in [f for f in self.starved if self.room_for(f) > 0]:
            del self.starved[flow]
            flow._budget_freed()
        if not self.starved:
            self.low_water = self.default_low_water

    def close_all(self, now: float) -> None:
        """Shutdown: reset every guest connection and close every host socket."""
        for flow in list(self.flows.values()):
            flow._abort(now, rst_guest=True)
        self.dirty = []

    def __len__(self) -> int:
        return len(self.flows)
