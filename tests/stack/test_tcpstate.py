"""The TCP state table: every state reachable, illegal moves refused."""

from __future__ import annotations

import pytest

from pyslirp.stack.tcpstate import TRANSITIONS, IllegalTransition, TcpState, next_state


def test_every_state_has_an_entry_and_can_close() -> None:
    assert set(TRANSITIONS) == set(TcpState)
    assert all(TcpState.CLOSED in targets for targets in TRANSITIONS.values())


def test_every_state_is_reachable_from_closed() -> None:
    seen = {TcpState.CLOSED}
    todo = [TcpState.CLOSED]
    while todo:
        for target in TRANSITIONS[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(TcpState)


def test_a_legal_transition_returns_the_new_state() -> None:
    assert next_state(TcpState.ESTABLISHED, TcpState.CLOSE_WAIT) is TcpState.CLOSE_WAIT


@pytest.mark.parametrize(("current", "new"), [
    (TcpState.CLOSED, TcpState.ESTABLISHED),
    (TcpState.TIME_WAIT, TcpState.ESTABLISHED),
    (TcpState.FIN_WAIT_2, TcpState.FIN_WAIT_1),
    (TcpState.CONNECTING, TcpState.ESTABLISHED),
])
def test_an_illegal_transition_raises_naming_both_states(current: TcpState,
                                                          new: TcpState) -> None:
    with pytest.raises(IllegalTransition, match=f"{current} cannot go to {new}"):
        next_state(current, new)


def test_states_compare_and_print_as_their_names() -> None:
    assert TcpState.ESTABLISHED == "ESTABLISHED"
    assert f"{TcpState.TIME_WAIT}" == "TIME_WAIT"
