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
"""

from __future__ import annotations

from collections.abc import Hashable

#: New flows per second a guest may open (per engine), and the burst allowed.
DEFAULT_NEW_FLOW_RATE = 2000.0
DEFAULT_NEW_FLOW_BURST = 5000
#: Destinations remembered as having accepted a connection.
KNOWN_PEERS = 1024


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

    def add(self, peer: Hashable) -> None:
        """Remember ``peer`` as the newest, forgetting the oldest past ``size``."""
        peers = self._peers
        peers.pop(peer, None)
        peers[peer] = None
        if len(peers) > self.size:
            del peers[next(iter(peers))]
