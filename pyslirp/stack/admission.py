"""Admission of new flows from the guest: a token bucket and a set of known-good peers.

Theory of operation
-------------------
A guest can ask for new flows far faster than the stack can open host
sockets for them: each new TCP flow costs a host socket, a connect and (to a
closed port) a refusal and an RST back, ~50 us of Python, while the guest
makes one in a few microseconds. Unchecked, a SYN flood (or UDP to ever new
ports) fills the TAP queue and the kernel drops the frames of every flow
behind it, well-behaved ones too.

So each engine checks a new flow against a :class:`TokenBucket` *before* any
host syscall: ``NetConfig.new_flow_rate`` flows per second, in bursts of up to
``NetConfig.new_flow_burst``. The defaults (2,000/s, 5,000 at once) leave
normal bursts alone (bench's connect workload opens ~5,000 connections/s for
under a second) and cap what a flood costs. What the bucket refuses is
dropped and counted; the guest's TCP retransmits its SYN a second later, as
after any loss.

A flood must not lock the guest out of the services it already uses, so a
destination that accepted a connection lately is remembered
(:class:`KnownPeers`, a bounded LRU set) and new flows to it pass without a
token. A flood to closed ports never gets in; one to an open port is a
connection flood, bounded by the flow table instead.

Refused flows still cost the runtime a TAP read each, and a flood's frames
fill the TAP's queue ahead of the guest's other frames. So each engine also
keeps a :class:`FloodWatch`, reviewed by the runtime every
``FLOOD_REVIEW_INTERVAL`` while a flood lasts: once the new flows asked for
(refused or admitted) reach ``FLOOD_ENGAGE`` times the bucket's rate, it asks
for a *flood filter* (the engine says which frames: ``UdpEngine.flood_filter``,
``TcpEngine.syn_flood_filter``) that the device applies before it reads a
frame (the TAP: a socket filter in the guest's kernel,
:mod:`pyslirp.runtime.framefilter`), letting through a random ``keep`` share of
about ``FLOOD_SAMPLE`` times the rate: enough that the bucket spends every token
it would have spent, and that the watch goes on measuring the flood. Below
``FLOOD_RELEASE`` times the rate the filter comes off.
"""

from __future__ import annotations

from collections.abc import Hashable

#: New flows per second a guest may open (per engine), and the burst allowed.
DEFAULT_NEW_FLOW_RATE = 2000.0
DEFAULT_NEW_FLOW_BURST = 5000
#: Destinations remembered as having accepted a connection.
KNOWN_PEERS = 1024
#: The flood filter (FloodWatch): reviewed this often while a flood lasts; on at
#: FLOOD_ENGAGE times the bucket's rate, letting about FLOOD_SAMPLE times it
#: through, off under FLOOD_RELEASE times it.
FLOOD_REVIEW_INTERVAL = 0.1
FLOOD_ENGAGE = 8.0
FLOOD_SAMPLE = 4.0
FLOOD_RELEASE = 2.0
#: The smallest share of a flood let through (a flood of ~500 M frames/s at 2,000/s).
FLOOD_MIN_KEEP = 2.0 ** -16


class TokenBucket:
    """``rate`` events per second, bursts of up to ``burst`` (default: one second's worth)."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self.tokens = self.burst
        self.at: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token if there is one (time ``now`` refills the bucket first)."""
        at = self.at
        if at is not None and now > at:
            self.tokens = min(self.burst, self.tokens + (now - at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class KnownPeers:
    """The ``size`` destinations most recently seen to accept a flow (an LRU set)."""

    __slots__ = ("size", "_peers")

    def __init__(self, size: int = KNOWN_PEERS) -> None:
        self.size = size
        self._peers: dict[Hashable, None] = {}

    def __contains__(self, peer: Hashable) -> bool:
        return peer in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def ports_of(self, address: bytes) -> list[int]:
        """The ports of the known peers at ``address`` (peers are (address, port))."""
        return [peer[1] for peer in self._peers
                if isinstance(peer, tuple) and peer[0] == address]

    def add(self, peer: Hashable) -> None:
        """Remember ``peer`` as the newest, forgetting the oldest past ``size``."""
        peers = self._peers
        peers.pop(peer, None)
        peers[peer] = None
        if len(peers) > self.size:
            del peers[next(iter(peers))]


class FloodWatch:
    """Whether a flood of new flows wants a filter, and what share it lets through.

    :meth:`review` gets, every ``FLOOD_REVIEW_INTERVAL``, the running total of new
    flows the engine was asked for (refused or admitted: what a filter samples)."""

    __slots__ = ("rate", "keep", "flood_rate", "_seen", "_at")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        #: The share a filter lets through, or None while no filter is wanted.
        self.keep: float | None = None
        #: New flows a second asked for (read or not) in the last review's window.
        self.flood_rate = 0.0
        self._seen = 0
        self._at = 0.0

    def review(self, now: float, seen_total: int, flooding: bool) -> int:
        """Update :attr:`keep` (None: no filter) from the new flows asked for since
        the last review; ``flooding``: the engine knows what to filter. Returns the
        estimated number of them the filter kept from the engine in that window."""
        seen = seen_total - self._seen
        elapsed = now - self._at
        self._seen, self._at = seen_total, now
        keep = self.keep if self.keep is not None else 1.0
        unread = round(seen * (1.0 / keep - 1.0))
        # The first review after a quiet spell measures nothing: its window is not one.
        flood = seen / keep / elapsed if 0 < elapsed <= 3 * FLOOD_REVIEW_INTERVAL else 0.0
        self.flood_rate = flood
        wanted: float | None = None
        threshold = FLOOD_RELEASE if self.keep is not None else FLOOD_ENGAGE
        if flooding and flood >= threshold * self.rate:
            wanted = max(FLOOD_MIN_KEEP, min(1.0, FLOOD_SAMPLE * self.rate / flood))
            if self.keep is not None and self.keep / 2 <= wanted <= self.keep * 2:
                wanted = self.keep  # close enough: no new program for the device
        self.keep = wanted
        return unread
