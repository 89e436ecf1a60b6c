"""TCP connection states and the transitions between them, as a table.

Theory of operation
-------------------
:class:`TcpState` names the states of RFC 9293 3.3.2 plus ``CONNECTING``
(the guest's SYN arrived and the host connect is in progress; nothing has
been answered yet). The members are strings (a ``StrEnum``), so they print
and compare as their names and hash as fast as any ``str`` on the
per-frame path.

:data:`TRANSITIONS` lists, for each state, the states a flow may move to;
:func:`next_state` is the only way the TCP engine changes a flow's state and
raises :class:`IllegalTransition` for any move the table does not list, so a
logic error shows up where it happens instead of as a confused connection
later. Any state may go to ``CLOSED`` (the flow is forgotten), including
``CLOSED`` itself: forgetting a flow twice is harmless.

What moves a flow (pyslirp's side is the passive end for guest-opened flows
and the active end for port-forwarded ones)::

    CLOSED      -> CONNECTING   guest SYN, host connect started
    CLOSED      -> SYN_SENT     port forward: our SYN to the guest
    CONNECTING  -> SYN_RCVD     host connected: SYN-ACK to the guest
    SYN_RCVD    -> ESTABLISHED  the guest ACKed our SYN-ACK
    SYN_SENT    -> ESTABLISHED  the guest's SYN-ACK
    ESTABLISHED -> FIN_WAIT_1   our FIN sent (host EOF)
    ESTABLISHED -> CLOSE_WAIT   the guest's FIN
    CLOSE_WAIT  -> LAST_ACK     our FIN sent
    FIN_WAIT_1  -> FIN_WAIT_2   our FIN ACKed
    FIN_WAIT_1  -> CLOSING      the guest's FIN (simultaneous close)
    FIN_WAIT_2  -> TIME_WAIT    the guest's FIN
    CLOSING     -> TIME_WAIT    our FIN ACKed
    LAST_ACK    -> TIME_WAIT    our FIN ACKed, the host still draining
"""

from __future__ import annotations

from enum import StrEnum


class TcpState(StrEnum):
    CONNECTING = "CONNECTING"
    SYN_SENT = "SYN_SENT"
    SYN_RCVD = "SYN_RCVD"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    CLOSED = "CLOSED"


_S = TcpState

#: For each state, where a flow may go next (CLOSED is added to every entry).
TRANSITIONS: dict[TcpState, frozenset[TcpState]] = {
    state: frozenset(targets) | {_S.CLOSED} for state, targets in {
        _S.CLOSED: (_S.CONNECTING, _S.SYN_SENT),
        _S.CONNECTING: (_S.SYN_RCVD,),
        _S.SYN_RCVD: (_S.ESTABLISHED,),
        _S.SYN_SENT: (_S.ESTABLISHED,),
        _S.ESTABLISHED: (_S.FIN_WAIT_1, _S.CLOSE_WAIT),
        _S.CLOSE_WAIT: (_S.LAST_ACK,),
        _S.FIN_WAIT_1: (_S.FIN_WAIT_2, _S.CLOSING),
        _S.FIN_WAIT_2: (_S.TIME_WAIT,),
        _S.CLOSING: (_S.TIME_WAIT,),
        _S.LAST_ACK: (_S.TIME_WAIT,),
        _S.TIME_WAIT: (),
    }.items()
}


class IllegalTransition(RuntimeError):
    """A flow was asked to move between states the table does not connect."""


def next_state(current: TcpState, new: TcpState) -> TcpState:
    """``new`` if the table allows ``current -> new``; raise IllegalTransition if not."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"TCP state {current} cannot go to {new}")
    return new
