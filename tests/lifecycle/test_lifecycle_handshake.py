"""The handshake's deadlines as machine timers (HANDSHAKE), and the QR on show.

Until `ready` the upstream must move the handshake on: answer within the
connect timeout once the connection is up and, once pairing, show the next QR
(or pair) before the current one expires, plus the connect timeout. Stray
frames are no progress. Event by event, no clock.
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from broker.lifecycle.actions import (
    Action,
    CancelTimer,
    CloseConnection,
    Emit,
    OpenConnection,
    SaveCredentials,
    StartTimer,
    Timer,
)
from broker.lifecycle.inputs import (
    Closed,
    Connected,
    Event,
    LinkUp,
    Paired,
    PongReceived,
    QrReceived,
    Start,
    Stop,
    TimerFired,
)
from broker.lifecycle.machine import SessionMachine
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.reasons import DisconnectCode as D
from broker.lifecycle.states import (
    HANDSHAKE_TIMED_OUT,
    HANDSHAKE_UNANSWERED,
    PAIRING_TIMED_OUT,
    State,
)

TIMEOUT = 10.0
#: No attempt budget, no keep-alive: only the handshake's rules are in play.
POLICY = LifecyclePolicy(attempt_burst=0, keepalive_interval_s=None, max_qr_codes=3)


def make(timeout: float | None = TIMEOUT) -> SessionMachine:
    return SessionMachine(POLICY, rng=random.Random(1), handshake_timeout_s=timeout)


def qr(index: int = 1, expires_in_ms: int = 20_000) -> QrReceived:
    return QrReceived(code=f"q{index}", index=index, expires_in_ms=expires_in_ms)


def emits(actions: list[Action]) -> list[Emit]:
    return [a for a in actions if isinstance(a, Emit)]


def test_the_link_coming_up_arms_the_connect_timeout() -> None:
    m = make()
    m.handle(Start())
    assert m.handle(LinkUp()) == [StartTimer(Timer.HANDSHAKE, TIMEOUT)]
    assert Timer.HANDSHAKE in m.armed_timers


def test_ready_disarms_it() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    actions = m.handle(Connected())
    assert actions[0] == CancelTimer(Timer.HANDSHAKE)
    assert m.state is State.OPEN and Timer.HANDSHAKE not in m.armed_timers
    # A late firing (the race with the cancel) changes nothing.
    assert m.handle(TimerFired(Timer.HANDSHAKE)) == []


def test_an_unanswered_handshake_closes_408_and_backs_off_as_a_failed_attempt() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    actions = m.handle(TimerFired(Timer.HANDSHAKE))
    assert actions[0] == CloseConnection(D.TIMED_OUT, HANDSHAKE_TIMED_OUT)
    (emit,) = emits(actions)
    assert emit.state is State.RECONNECTING and emit.previous is State.CONNECTING
    assert emit.code == int(D.TIMED_OUT) and emit.reason == HANDSHAKE_UNANSWERED
    assert m.attempt == 1  # never opened: a failure, not a drop
    assert StartTimer(Timer.RETRY, emit.retry_in_s or 0.0) in actions


def test_each_qr_rearms_it_for_its_expiry_plus_the_connect_timeout() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    actions = m.handle(qr(1, expires_in_ms=20_000), now=100.0)
    assert actions[0] == StartTimer(Timer.HANDSHAKE, 20.0 + TIMEOUT)
    assert isinstance(actions[-1], Emit) and actions[-1].state is State.PAIRING
    actions = m.handle(qr(2, expires_in_ms=5_000), now=120.0)
    assert actions[0] == StartTimer(Timer.HANDSHAKE, 5.0 + TIMEOUT)
    assert m.qr_index == 2 and m.qr_expires_at == 125.0


def test_a_qr_that_expires_with_no_successor_starts_a_new_pairing_round() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    m.handle(qr(1))
    actions = m.handle(TimerFired(Timer.HANDSHAKE))
    assert actions[0] == CloseConnection(D.TIMED_OUT, HANDSHAKE_TIMED_OUT)
    assert OpenConnection() in actions  # a fresh round at once, as for a 408 while pairing
    (emit,) = emits(actions)
    assert emit.state is State.CONNECTING and emit.previous is State.PAIRING
    assert m.attempt == 0


def test_a_new_connection_after_pairing_owes_an_answer_again() -> None:
    """After the 515 restart the next connection gets the connect timeout anew."""
    m = SessionMachine(POLICY, handshake_timeout_s=TIMEOUT)
    m.handle(Start())
    m.handle(LinkUp())
    m.handle(qr(1))
    m.handle(Paired({"token": "t"}))
    m.handle(Closed(D.RESTART_REQUIRED))
    assert m.state is State.CONNECTING
    m.handle(LinkUp())
    (emit,) = emits(m.handle(TimerFired(Timer.HANDSHAKE)))
    assert emit.reason == HANDSHAKE_UNANSWERED


def test_a_qr_expiring_past_the_qr_limit_gives_up() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    for index in (1, 2, 3):
        m.handle(qr(index))
    (emit,) = emits(m.handle(TimerFired(Timer.HANDSHAKE)))
    assert emit.state is State.FAILED and emit.reason == PAIRING_TIMED_OUT


def test_stray_frames_do_not_move_the_deadline() -> None:
    m = make()
    m.handle(Start())
    m.handle(LinkUp())
    assert m.handle(PongReceived()) == []  # no ping in flight: not progress either
    assert m.handle(Paired({"token": "t"})) == [SaveCredentials({"token": "t"})]
    assert Timer.HANDSHAKE in m.armed_timers


def test_without_a_timeout_no_deadline_is_armed() -> None:
    m = make(None)
    m.handle(Start())
    assert m.handle(LinkUp()) == []
    actions = m.handle(qr(1))
    assert all(not isinstance(a, StartTimer) for a in actions)


def test_link_up_outside_connecting_is_ignored() -> None:
    m = make()
    assert m.handle(LinkUp()) == []  # STOPPED
    m.handle(Start())
    m.handle(Connected())
    assert m.handle(LinkUp()) == []  # OPEN


def test_qr_state_lives_in_the_machine_and_is_cleared_outside_pairing() -> None:
    m = make()
    m.handle(Start())
    assert (m.qr, m.qr_index, m.qr_expires_at) == (None, 0, None)
    m.handle(LinkUp())
    m.handle(qr(4, expires_in_ms=1_500), now=10.0)
    assert (m.qr, m.qr_index, m.qr_expires_at) == ("q4", 4, 11.5)
    m.handle(Stop())
    assert m.qr is None and m.qr_expires_at is None


EVENTS = st.sampled_from([
    Start(), Stop(), LinkUp(), Connected(), qr(1), Paired({"k": 1}),
    Closed(D.CONNECTION_CLOSED), Closed(D.RESTART_REQUIRED), Closed(D.TIMED_OUT),
    TimerFired(Timer.HANDSHAKE), TimerFired(Timer.RETRY),
])


@given(st.lists(EVENTS, max_size=40))
def test_the_handshake_timer_runs_only_while_connecting_or_pairing(events: list[Event]) -> None:
    m = make()
    for event in events:
        m.handle(event)
        if Timer.HANDSHAKE in m.armed_timers:
            assert m.state in (State.CONNECTING, State.PAIRING)
