"""Round-trip time estimation and the retransmission timeout (RFC 6298).

Theory of operation
-------------------
One :class:`RttEstimator` per TCP flow keeps the smoothed RTT (``srtt``), its
variation (``rttvar``) and the resulting timeout (``rto``), clamped to
``[rto_min, rto_max]`` (RFC 6298 2.4/2.5; pyslirp's minimum is 200 ms, as
Linux's, not 1 s: the guest is a local queue away). Samples come from one
timed segment at a time (Karn's algorithm, RFC 6298 3): the flow starts
timing a segment with :meth:`RttEstimator.time_segment`, and an ACK that
covers ``timed_seq`` yields a sample (:meth:`RttEstimator.sample_timed`). A
retransmission discards the timed segment (:meth:`RttEstimator.discard_timed`),
since its ACK could answer either copy, and backs the timeout off
exponentially (:meth:`RttEstimator.back_off`, RFC 6298 5.5).

The TCP engine reads ``timed_seq`` directly on its per-frame path (an
attribute, not a call); everything else goes through the methods.
"""

from __future__ import annotations


class RttEstimator:
    """RFC 6298 state of one flow; times are in seconds."""

    __slots__ = ("srtt", "rttvar", "rto", "rto_min", "rto_max", "timed_seq", "timed_at")

    def __init__(self, rto_initial: float, rto_min: float, rto_max: float) -> None:
        if not 0 < rto_min <= rto_max:
            raise ValueError(f"RTO bounds must satisfy 0 < rto_min <= rto_max, "
                             f"got {rto_min} and {rto_max}")
        #: Smoothed round-trip time; None until the first sample (RFC 6298 2.1).
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = rto_initial
        self.rto_min = rto_min
        self.rto_max = rto_max
        #: The sequence number whose acknowledgement completes the timed round
        #: trip, or None when no segment is being timed.
        self.timed_seq: int | None = None
        #: When the timed segment was sent.
        self.timed_at = 0.0

    def sample(self, rtt: float) -> None:
        """Fold one measured round trip into the estimate (RFC 6298 2.2, 2.3)."""
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            # (Conditional expressions, not abs()/max(): this runs once per ACK.)
            error = self.srtt - rtt
            self.rttvar = 0.75 * self.rttvar + 0.25 * (error if error >= 0 else -error)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        variation = 4 * self.rttvar
        rto = self.srtt + (variation if variation > 0.001 else 0.001)
        self.rto = (self.rto_min if rto < self.rto_min
                    else self.rto_max if rto > self.rto_max else rto)

    def time_segment(self, seq: int, now: float) -> None:
        """Start timing: the round trip ends when ``seq`` is acknowledged."""
        self.timed_seq = seq
        self.timed_at = now

    def sample_timed(self, now: float) -> None:
        """The timed segment was acknowledged at ``now``: take the sample, stop timing."""
        self.sample(now - self.timed_at)
        self.timed_seq = None

    def discard_timed(self) -> None:
        """Karn's algorithm: no sample from a segment that was (or may be) resent."""
        self.timed_seq = None

    def back_off(self) -> None:
        """Double the timeout after it expired (RFC 6298 5.5), up to ``rto_max``."""
        self.rto = min(self.rto * 2, self.rto_max)
