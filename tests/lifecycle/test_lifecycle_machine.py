"""The session state machine, driven event by event (no I/O, no clock)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.lifecycle.actions import (
    Action,
    CancelTimer,
    ClearCredentials,
    ClearKeys,
    CloseConnection,
    Emit,
    OpenConnection,
    SaveCredentials,
    SendLogout,
    SendPing,
    StartTimer,
    Timer,
)
from broker.lifecycle.backoff import delay_for
from broker.lifecycle.inputs import (
    Closed,
    Connected,
    CredentialsUnreadable,
    Event,
    Logout,
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
    PAIRING_TIMED_OUT,
    State,
    credentials_unreadable_reason,
)


class MaxRng(random.Random):
    """Jitter always picks the top of its range, so delays are exact in assertions."""

    def uniform(self, a: float, b: float) -> float:
        return b


POLICY = LifecyclePolicy()


def make(policy: LifecyclePolicy = POLICY) -> SessionMachine:
    return SessionMachine(policy, rng=MaxRng())


def emit(
    state: State,
    previous: State,
    reason: str,
    code: int = 0,
    *,
    retry_in_s: float | None = None,
    qr: str | None = None,
    attempt: int = 0,
) -> Emit:
    return Emit(state, previous, reason, code, retry_in_s, qr, attempt)


def qr(code: str = "q1", index: int = 1) -> QrReceived:
    return QrReceived(code=code, index=index, expires_in_ms=20_000)


def feed(m: SessionMachine, *events: Event) -> list[Action]:
    """Feed several events; return the actions of the last one."""
    actions: list[Action] = []
    for event in events:
        actions = m.handle(event)
    return actions


def drive_to(state: State, policy: LifecyclePolicy = POLICY) -> SessionMachine:
    """A machine brought to `state` by ordinary events."""
    m = make(policy)
    path: dict[State, list[Event]] = {
        State.STOPPED: [],
        State.CONNECTING: [Start()],
        State.PAIRING: [Start(), qr()],
        State.OPEN: [Start(), Connected()],
        State.RECONNECTING: [Start(), Closed(D.CONNECTION_CLOSED)],
        State.LOGGED_OUT: [Start(), Closed(D.LOGGED_OUT)],
        State.CONFLICT: [Start(), Closed(D.REPLACED)],
        State.FAILED: [Start(), Closed(D.FORBIDDEN)],
    }
    feed(m, *path[state])
    assert m.state is state
    return m


OPEN_TIMERS: list[Action] = [CancelTimer(Timer.KEEPALIVE)]
SLACK = POLICY.keepalive_slack_s
"""Keep-alives may run out this late (the default policy's 15 s interval allows all of it)."""
#: No attempt budget: for rules that are not about it (tests/lifecycle/test_lifecycle_storm.py).
UNBOUNDED = LifecyclePolicy(attempt_burst=0)


# -- start / connect ------------------------------------------------------------


def test_start_then_connected_opens_with_the_keepalive_timer() -> None:
    m = make()
    assert m.handle(Start()) == [
        OpenConnection(),
        emit(State.CONNECTING, State.STOPPED, "started"),
    ]
    assert m.handle(Connected()) == [
        StartTimer(Timer.KEEPALIVE, 15.0, SLACK),
        emit(State.OPEN, State.CONNECTING, "connected"),
    ]
    assert (m.state, m.reason, m.code, m.attempt) == (State.OPEN, "connected", 0, 0)


def test_sessions_that_open_together_do_not_ping_together() -> None:
    """The first ping of a connection waits a random 50-100 % of the interval (then
    the full interval from each pong), so sessions opened in one burst spread out."""
    rng = random.Random(11)
    firsts = []
    for _ in range(200):
        m = SessionMachine(POLICY, rng=rng)
        m.handle(Start())
        [timer] = [a for a in m.handle(Connected()) if isinstance(a, StartTimer)]
        assert timer.timer is Timer.KEEPALIVE
        firsts.append(timer.delay_s)
    assert all(7.5 <= d <= 15.0 for d in firsts)
    assert max(firsts) - min(firsts) > 6.0  # spread over the range, not one instant
    m = drive_to(State.OPEN)
    m.handle(TimerFired(Timer.KEEPALIVE))
    assert StartTimer(Timer.KEEPALIVE, 15.0, SLACK) in m.handle(PongReceived())


def test_a_keepalive_may_be_late_by_the_slack_a_tenth_of_the_interval_at_most() -> None:
    """The slack lets the loop fire many sessions' pings in one wake; it never
    stretches a short interval by more than a tenth, and 0 keeps pings on time."""
    def next_ping(policy: LifecyclePolicy) -> StartTimer:
        m = drive_to(State.OPEN, policy)
        m.handle(TimerFired(Timer.KEEPALIVE))
        [timer] = [a for a in m.handle(PongReceived()) if isinstance(a, StartTimer)]
        return timer

    assert next_ping(POLICY) == StartTimer(Timer.KEEPALIVE, 15.0, 0.25)
    assert next_ping(LifecyclePolicy(keepalive_interval_s=1.0)).slack_s == 0.1
    assert next_ping(LifecyclePolicy(keepalive_slack_s=0)).slack_s == 0.0
    with pytest.raises(ValueError):
        LifecyclePolicy(keepalive_slack_s=-1)
    first = [a for a in feed(make(), Start(), Connected()) if isinstance(a, StartTimer)]
    assert [t.slack_s for t in first] == [0.25]  # the first ping, too
    retry = [a for a in feed(make(), Start(), Connected(), Closed(D.CONNECTION_CLOSED))
             if isinstance(a, StartTimer)]
    assert [(t.timer, t.slack_s) for t in retry] == [(Timer.RETRY, 0.0)]  # redials stay on time


def test_connected_without_keepalive_arms_no_timer() -> None:
    m = make(LifecyclePolicy(keepalive_interval_s=None))
    assert feed(m, Start(), Connected()) == [
        emit(State.OPEN, State.CONNECTING, "connected"),
    ]
    assert m.handle(TimerFired(Timer.KEEPALIVE)) == []


# -- one test per row of the reason table ------------------------------------------


@pytest.mark.parametrize("code", [D.CONNECTION_CLOSED, D.TIMED_OUT, D.BAD_FRAME])
def test_drop_after_open_is_redialled_promptly_and_failed_attempts_escalate(code: D) -> None:
    m = drive_to(State.OPEN)
    # The connection had opened: connecting works, so only the small redial jitter.
    assert m.handle(Closed(code)) == [
        *OPEN_TIMERS,
        StartTimer(Timer.RETRY, 0.25),
        emit(State.RECONNECTING, State.OPEN, code.text, code, retry_in_s=0.25),
    ]
    assert m.handle(TimerFired(Timer.RETRY)) == [
        OpenConnection(),
        emit(State.CONNECTING, State.RECONNECTING, "reconnecting"),
    ]
    # The attempt itself fails: a failure to connect, full-jitter backoff from 0.5 s...
    assert m.handle(Closed(code, "refused")) == [
        StartTimer(Timer.RETRY, 0.5),
        emit(State.RECONNECTING, State.CONNECTING, "refused", code, retry_in_s=0.5, attempt=1),
    ]
    # ...whose window doubles with each failure in a row.
    feed(m, TimerFired(Timer.RETRY))
    assert m.handle(Closed(code, "refused")) == [
        StartTimer(Timer.RETRY, 1.0),
        emit(State.RECONNECTING, State.CONNECTING, "refused", code, retry_in_s=1.0, attempt=2),
    ]


def test_backoff_is_capped() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_attempts=0, attempt_burst=0))
    delays = []
    for _ in range(12):
        actions = feed(m, Closed(D.CONNECTION_CLOSED))
        timer = actions[0]
        assert isinstance(timer, StartTimer)
        delays.append(timer.delay_s)
        m.handle(TimerFired(Timer.RETRY))
    assert delays[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(delays[6:]) == {30.0}


def test_backoff_uses_the_injected_rng() -> None:
    m = SessionMachine(POLICY, rng=random.Random(42))
    feed(m, Start(), Closed(D.CONNECTION_CLOSED), TimerFired(Timer.RETRY))
    actions = m.handle(Closed(D.CONNECTION_CLOSED))
    rng = random.Random(42)
    first = delay_for(1, initial_s=0.5, max_s=30.0, rng=rng)
    second = delay_for(2, initial_s=0.5, max_s=30.0, rng=rng)
    assert 0 <= first <= 0.5
    assert actions[0] == StartTimer(Timer.RETRY, second)


def test_restart_required_reconnects_at_once_without_counting_an_attempt() -> None:
    m = drive_to(State.OPEN)
    assert m.handle(Closed(D.RESTART_REQUIRED)) == [
        *OPEN_TIMERS,
        OpenConnection(),
        emit(State.CONNECTING, State.OPEN, "restart required", 515),
    ]
    assert m.attempt == 0


def test_restart_required_before_the_connection_got_anywhere_backs_off() -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Closed(D.RESTART_REQUIRED)) == [
        StartTimer(Timer.RETRY, 0.5),
        emit(
            State.RECONNECTING, State.CONNECTING, "restart required", 515, retry_in_s=0.5, attempt=1
        ),
    ]


def test_restart_required_right_after_credentials_reconnects_at_once() -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Paired({"token": "t"})) == [SaveCredentials({"token": "t"})]
    assert m.handle(Closed(D.RESTART_REQUIRED)) == [
        OpenConnection(),
        emit(State.CONNECTING, State.CONNECTING, "restart required", 515),
    ]
    # The next connection has not paired: another 515 counts as a failure.
    assert m.handle(Closed(D.RESTART_REQUIRED))[-1] == emit(
        State.RECONNECTING, State.CONNECTING, "restart required", 515, retry_in_s=0.5, attempt=1
    )


@pytest.mark.parametrize("code", [D.UNAVAILABLE, D.RATE_LIMITED])
def test_unavailable_or_rate_limited_uses_the_slow_backoff(code: D) -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Closed(code)) == [
        StartTimer(Timer.RETRY, 5.0),
        emit(State.RECONNECTING, State.CONNECTING, code.text, code, retry_in_s=5.0, attempt=1),
    ]
    feed(m, TimerFired(Timer.RETRY))
    assert m.handle(Closed(code))[0] == StartTimer(Timer.RETRY, 10.0)


@pytest.mark.parametrize("code", [D.UNAVAILABLE, D.RATE_LIMITED])
def test_retry_after_is_honoured(code: D) -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Closed(code, "busy", retry_after_ms=42_000)) == [
        StartTimer(Timer.RETRY, 42.0),
        emit(State.RECONNECTING, State.CONNECTING, "busy", code, retry_in_s=42.0, attempt=1),
    ]


def test_short_retry_after_does_not_shorten_the_backoff() -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Closed(D.UNAVAILABLE, retry_after_ms=100))[0] == StartTimer(Timer.RETRY, 5.0)


def test_retry_after_is_a_floor_even_with_real_jitter() -> None:
    m = SessionMachine(POLICY, rng=random.Random(3))
    actions = feed(m, Start(), Closed(D.RATE_LIMITED, retry_after_ms=7_000))
    assert isinstance(actions[0], StartTimer)
    assert actions[0].delay_s >= 7.0


def test_replaced_goes_to_conflict_and_retries_only_after_a_long_jittered_delay() -> None:
    m = drive_to(State.OPEN)
    # MaxRng: 300 s plus the full 10 % jitter.
    assert m.handle(Closed(D.REPLACED)) == [
        *OPEN_TIMERS,
        StartTimer(Timer.RETRY, 330.0),
        emit(State.CONFLICT, State.OPEN, D.REPLACED.text, 440, retry_in_s=330.0),
    ]
    assert m.attempt == 0
    assert m.handle(TimerFired(Timer.RETRY)) == [
        OpenConnection(),
        emit(State.CONNECTING, State.CONFLICT, "retrying after conflict"),
    ]


def test_conflict_delay_stays_within_its_jitter_band() -> None:
    m = SessionMachine(POLICY, rng=random.Random(5))
    timer = feed(m, Start(), Closed(D.REPLACED))[0]
    assert isinstance(timer, StartTimer)
    assert 300.0 <= timer.delay_s <= 330.0


def test_replaced_without_conflict_retry_waits_for_an_operator() -> None:
    m = drive_to(State.OPEN, LifecyclePolicy(conflict_retry_s=None))
    assert m.handle(Closed(D.REPLACED)) == [
        *OPEN_TIMERS,
        emit(State.CONFLICT, State.OPEN, D.REPLACED.text, 440),
    ]
    assert m.handle(TimerFired(Timer.RETRY)) == []
    assert m.state is State.CONFLICT
    assert m.handle(Start())[0] == OpenConnection()


def test_logged_out_wipes_credentials_and_never_reconnects() -> None:
    m = drive_to(State.OPEN)
    assert m.handle(Closed(D.LOGGED_OUT)) == [
        *OPEN_TIMERS,
        ClearCredentials(),
        ClearKeys(),
        emit(State.LOGGED_OUT, State.OPEN, "logged out", 401),
    ]
    for event in (TimerFired(Timer.RETRY), Closed(D.CONNECTION_CLOSED), Connected(), qr()):
        assert m.handle(event) == []
    assert m.state is State.LOGGED_OUT
    assert m.handle(Start()) == [
        OpenConnection(),
        emit(State.CONNECTING, State.LOGGED_OUT, "started"),
    ]


def test_bad_session_fails_and_wipes_the_corrupt_credentials() -> None:
    m = drive_to(State.CONNECTING)
    assert m.handle(Closed(D.BAD_SESSION)) == [
        ClearCredentials(),
        ClearKeys(),
        emit(State.FAILED, State.CONNECTING, "bad session", 500),
    ]
    assert m.handle(TimerFired(Timer.RETRY)) == []


def test_undecryptable_credentials_fail_for_good_and_keep_them() -> None:
    m = drive_to(State.CONNECTING)
    reason = credentials_unreadable_reason("k1")
    assert m.handle(CredentialsUnreadable("k1", "do not decrypt")) == [
        emit(State.FAILED, State.CONNECTING, reason, 0),
    ]
    assert "'k1'" in reason
    assert m.handle(TimerFired(Timer.RETRY)) == []
    assert m.handle(CredentialsUnreadable("k1")) == []  # a late one changes nothing


def test_forbidden_fails_and_keeps_the_credentials() -> None:
    m = drive_to(State.OPEN)
    assert m.handle(Closed(D.FORBIDDEN, "banned")) == [
        *OPEN_TIMERS,
        emit(State.FAILED, State.OPEN, "banned", 403),
    ]


# -- keep-alive -----------------------------------------------------------------


def test_keepalive_ping_pong_cycle() -> None:
    m = drive_to(State.OPEN)
    assert m.handle(TimerFired(Timer.KEEPALIVE)) == [SendPing(), StartTimer(Timer.PONG, 10.0)]
    assert m.handle(PongReceived()) == [
        CancelTimer(Timer.PONG),
        StartTimer(Timer.KEEPALIVE, 15.0, SLACK),
    ]
    # A duplicate pong, and a PONG timer that raced with the cancel, change nothing.
    assert m.handle(PongReceived()) == []
    assert m.handle(TimerFired(Timer.PONG)) == []
    assert m.state is State.OPEN


def test_missed_pong_closes_and_reconnects_promptly() -> None:
    m = drive_to(State.OPEN)
    m.handle(TimerFired(Timer.KEEPALIVE))
    reason = "keep-alive timed out"
    # A dead link, like a drop: redialled promptly.
    assert m.handle(TimerFired(Timer.PONG)) == [
        CloseConnection(D.TIMED_OUT, reason),
        StartTimer(Timer.RETRY, 0.25),
        emit(State.RECONNECTING, State.OPEN, reason, 408, retry_in_s=0.25),
    ]
    assert m.handle(PongReceived()) == []  # too late


def test_leaving_open_cancels_a_pending_pong() -> None:
    m = drive_to(State.OPEN)
    m.handle(TimerFired(Timer.KEEPALIVE))
    assert m.handle(Closed(D.CONNECTION_CLOSED))[:1] == [CancelTimer(Timer.PONG)]
    assert m.armed_timers == {Timer.RETRY}


# -- pairing --------------------------------------------------------------------


def test_pairing_with_qr_rotation_then_restart_then_open() -> None:
    m = drive_to(State.CONNECTING)
    pairing = "scan the QR code to pair"
    assert m.handle(qr("q1", 1)) == [emit(State.PAIRING, State.CONNECTING, pairing, qr="q1")]
    assert m.handle(qr("q2", 2)) == [emit(State.PAIRING, State.PAIRING, pairing, qr="q2")]
    assert (m.qr, m.qr_count) == ("q2", 2)
    creds: dict[str, Any] = {"token": "t-1"}
    assert m.handle(Paired(creds)) == [SaveCredentials({"token": "t-1"})]
    assert m.state is State.PAIRING
    assert m.handle(Closed(D.RESTART_REQUIRED)) == [
        OpenConnection(),
        emit(State.CONNECTING, State.PAIRING, "restart required", 515),
    ]
    assert m.qr is None
    feed(m, Connected())
    assert (m.state, m.qr, m.qr_count) == (State.OPEN, None, 0)


def test_expired_pairing_round_starts_a_fresh_one_at_once() -> None:
    m = drive_to(State.PAIRING)
    assert m.handle(Closed(D.TIMED_OUT)) == [
        OpenConnection(),
        emit(State.CONNECTING, State.PAIRING, "QR expired, requesting a new one", 408),
    ]
    assert (m.attempt, m.qr_count) == (0, 1)


def test_qr_limit_across_rounds_fails_pairing() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_qr_codes=3))
    feed(m, qr("a"), qr("b"), Closed(D.TIMED_OUT), qr("c"))
    assert m.qr_count == 3
    assert m.handle(Closed(D.TIMED_OUT)) == [
        emit(State.FAILED, State.PAIRING, PAIRING_TIMED_OUT, 408),
    ]
    assert m.handle(TimerFired(Timer.RETRY)) == []


def test_qr_limit_holds_within_one_round() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_qr_codes=2))
    feed(m, qr("a"), qr("b"))
    assert m.handle(qr("c")) == [
        CloseConnection(D.TIMED_OUT, PAIRING_TIMED_OUT),
        emit(State.FAILED, State.PAIRING, PAIRING_TIMED_OUT, 408),
    ]


def test_no_qr_limit_when_zero() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_qr_codes=0, attempt_burst=0))
    for i in range(50):
        feed(m, qr(f"q{i}"), Closed(D.TIMED_OUT))
    assert m.state is State.CONNECTING


def test_lost_connection_while_pairing_redials_promptly_and_keeps_the_qr_count() -> None:
    m = drive_to(State.PAIRING)
    # A QR means the upstream answered: the connection had opened.
    assert m.handle(Closed(D.CONNECTION_CLOSED)) == [
        StartTimer(Timer.RETRY, 0.25),
        emit(State.RECONNECTING, State.PAIRING, "connection closed", 428, retry_in_s=0.25),
    ]
    assert (m.qr, m.qr_count) == (None, 1)


# -- attempt counter ------------------------------------------------------------


def test_an_attempt_that_opens_resets_the_failure_count() -> None:
    m = drive_to(State.CONNECTING)
    feed(m, Closed(D.CONNECTION_CLOSED), TimerFired(Timer.RETRY))
    feed(m, Closed(D.CONNECTION_CLOSED), TimerFired(Timer.RETRY))
    assert m.attempt == 2
    feed(m, Connected())
    assert (m.state, m.attempt) == (State.OPEN, 0)
    assert m.handle(Closed(D.CONNECTION_CLOSED))[-1] == emit(
        State.RECONNECTING, State.OPEN, "connection closed", 428, retry_in_s=0.25
    )
    # The next failure starts the escalation over.
    feed(m, TimerFired(Timer.RETRY))
    assert m.handle(Closed(D.CONNECTION_CLOSED))[0] == StartTimer(Timer.RETRY, 0.5)


def test_a_connection_that_keeps_opening_and_dropping_is_never_backed_off() -> None:
    m = drive_to(State.OPEN)
    for _ in range(5):  # within the attempt budget (test_lifecycle_storm.py: past it)
        actions = feed(m, Closed(D.CONNECTION_CLOSED))
        assert actions[-2] == StartTimer(Timer.RETRY, 0.25)
        feed(m, TimerFired(Timer.RETRY), Connected())
    assert m.attempt == 0


def test_gives_up_after_max_attempts() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_attempts=2))
    feed(m, Closed(D.CONNECTION_CLOSED), TimerFired(Timer.RETRY))
    feed(m, Closed(D.UNAVAILABLE), TimerFired(Timer.RETRY))
    assert m.attempt == 2
    assert m.handle(Closed(D.CONNECTION_CLOSED)) == [
        emit(State.FAILED, State.CONNECTING, "gave up after 3 attempts", 428, attempt=3),
    ]
    assert m.handle(TimerFired(Timer.RETRY)) == []
    assert m.handle(Start())[-1] == emit(State.CONNECTING, State.FAILED, "started")
    assert m.attempt == 0


def test_never_gives_up_when_max_attempts_is_zero() -> None:
    m = drive_to(State.CONNECTING, LifecyclePolicy(max_attempts=0, attempt_burst=0))
    for _ in range(500):
        feed(m, Closed(D.CONNECTION_CLOSED), TimerFired(Timer.RETRY))
    assert (m.state, m.attempt) == (State.CONNECTING, 500)


# -- operator commands from every state ------------------------------------------

ALL_STATES = list(State)


@pytest.mark.parametrize("state", ALL_STATES)
def test_stop_from_every_state(state: State) -> None:
    m = drive_to(state)
    close: list[Action] = [CloseConnection(D.CONNECTION_CLOSED, "stopped")]
    before: dict[State, list[Action]] = {
        State.CONNECTING: close,
        State.PAIRING: close,
        State.OPEN: [*close, *OPEN_TIMERS],
        State.RECONNECTING: [CancelTimer(Timer.RETRY)],
        State.CONFLICT: [CancelTimer(Timer.RETRY)],
        State.LOGGED_OUT: [],
        State.FAILED: [],
    }
    expected: list[Action] = (
        []
        if state is State.STOPPED
        else [*before[state], emit(State.STOPPED, state, "stopped", attempt=m.attempt)]
    )
    assert m.handle(Stop()) == expected
    assert m.state is State.STOPPED
    assert m.armed_timers == frozenset()
    assert m.handle(Stop()) == []


@pytest.mark.parametrize("state", ALL_STATES)
def test_start_from_every_state(state: State) -> None:
    m = drive_to(state)
    actions = m.handle(Start())
    if state in (State.CONNECTING, State.PAIRING, State.OPEN):
        assert actions == []
        assert m.state is state
        return
    cancel: list[Action] = (
        [CancelTimer(Timer.RETRY)] if state in (State.RECONNECTING, State.CONFLICT) else []
    )
    assert actions == [*cancel, OpenConnection(), emit(State.CONNECTING, state, "started")]
    assert (m.attempt, m.qr_count, m.armed_timers) == (0, 0, frozenset())


@pytest.mark.parametrize("state", ALL_STATES)
def test_logout_from_every_state(state: State) -> None:
    m = drive_to(state)
    actions = m.handle(Logout())
    if state is State.OPEN:
        assert actions == [SendLogout()]
        assert m.state is State.OPEN
        return
    if state is State.LOGGED_OUT:
        assert actions == [ClearCredentials(), ClearKeys()]
        return
    close: list[Action] = [CloseConnection(D.LOGGED_OUT, "logged out by operator")]
    before: dict[State, list[Action]] = {
        State.STOPPED: [],
        State.CONNECTING: close,
        State.PAIRING: close,
        State.RECONNECTING: [CancelTimer(Timer.RETRY)],
        State.CONFLICT: [CancelTimer(Timer.RETRY)],
        State.FAILED: [],
    }
    assert actions == [
        *before[state],
        ClearCredentials(),
        ClearKeys(),
        emit(State.LOGGED_OUT, state, "logged out", 401, attempt=m.attempt),
    ]
    assert m.armed_timers == frozenset()


def test_logout_while_open_completes_on_the_upstream_401() -> None:
    m = drive_to(State.OPEN)
    assert m.handle(Logout()) == [SendLogout()]
    assert m.handle(Closed(D.LOGGED_OUT)) == [
        *OPEN_TIMERS,
        ClearCredentials(),
        ClearKeys(),
        emit(State.LOGGED_OUT, State.OPEN, "logged out", 401),
    ]


def test_logout_while_open_completes_even_if_the_close_has_another_code() -> None:
    m = drive_to(State.OPEN)
    m.handle(Logout())
    assert m.handle(Closed(D.CONNECTION_CLOSED))[-3:] == [
        ClearCredentials(),
        ClearKeys(),
        emit(State.LOGGED_OUT, State.OPEN, "logged out", 401),
    ]


def test_second_logout_while_waiting_forces_a_local_logout() -> None:
    m = drive_to(State.OPEN)
    m.handle(Logout())
    assert m.handle(Logout()) == [
        CloseConnection(D.LOGGED_OUT, "logged out by operator"),
        *OPEN_TIMERS,
        ClearCredentials(),
        ClearKeys(),
        emit(State.LOGGED_OUT, State.OPEN, "logged out", 401),
    ]


def test_stop_clears_a_pending_logout() -> None:
    m = drive_to(State.OPEN)
    feed(m, Logout(), Stop(), Start(), Connected())
    feed(m, Closed(D.CONNECTION_CLOSED))
    assert m.state is State.RECONNECTING


# -- events that do not apply -----------------------------------------------------

WITH_CONNECTION = {State.CONNECTING, State.PAIRING, State.OPEN}
LIVE_TIMERS = {
    (State.RECONNECTING, Timer.RETRY),
    (State.CONFLICT, Timer.RETRY),
    (State.OPEN, Timer.KEEPALIVE),
}
STALE: list[tuple[State, Event]] = [
    *[(s, Closed(D.CONNECTION_CLOSED)) for s in State if s not in WITH_CONNECTION],
    *[(s, Closed(D.LOGGED_OUT)) for s in (State.STOPPED, State.RECONNECTING, State.FAILED)],
    *[(s, PongReceived()) for s in State],
    *[(s, Connected()) for s in State if s not in (State.CONNECTING, State.PAIRING)],
    *[(s, qr()) for s in State if s not in (State.CONNECTING, State.PAIRING)],
    *[(s, Paired({"token": "x"})) for s in State if s not in (State.CONNECTING, State.PAIRING)],
    *[(s, TimerFired(t)) for s in State for t in Timer if (s, t) not in LIVE_TIMERS],
]


@pytest.mark.parametrize(("state", "event"), STALE)
def test_events_that_do_not_apply_are_ignored(state: State, event: Event) -> None:
    m = drive_to(state)
    before = (m.state, m.attempt, m.qr, m.qr_count, m.reason, m.code, m.armed_timers)
    assert m.handle(event) == []
    assert (m.state, m.attempt, m.qr, m.qr_count, m.reason, m.code, m.armed_timers) == before


def test_retry_timer_left_over_from_an_earlier_round_is_ignored() -> None:
    m = drive_to(State.RECONNECTING)
    feed(m, Start())  # cancels RETRY; its firing may still be in flight
    assert m.handle(TimerFired(Timer.RETRY)) == []
    assert m.state is State.CONNECTING


def test_restored_state_waits_for_start() -> None:
    m = SessionMachine(state=State.LOGGED_OUT)
    assert m.handle(TimerFired(Timer.RETRY)) == []
    assert m.handle(Start())[0] == OpenConnection()


# -- invariants over random event sequences ----------------------------------------

EVENTS: list[Event] = [
    Start(),
    Stop(),
    Logout(),
    Connected(),
    qr(),
    Paired({"token": "t"}),
    *[Closed(code, retry_after_ms=ms) for code in D for ms in (None, 3_000)],
    *[TimerFired(t) for t in Timer],
    PongReceived(),
]

RETRY_STATES = {State.RECONNECTING, State.CONFLICT}
OPEN_ONLY = {Timer.KEEPALIVE, Timer.PONG}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EVENTS), max_size=60), st.integers(0, 2**32))
def test_invariants_hold_for_any_event_sequence(events: list[Event], seed: int) -> None:
    policy = LifecyclePolicy(max_attempts=5, max_qr_codes=3)
    m = SessionMachine(policy, rng=random.Random(seed))
    for event in events:
        before = m.state
        actions = m.handle(event)
        emits = [a for a in actions if isinstance(a, Emit)]
        if m.state != before:
            assert len(emits) == 1 and actions[-1] is emits[0]
            assert (emits[0].previous, emits[0].state) == (before, m.state)
        else:
            # Only a new QR, the restart after pairing, or a Start the attempt budget
            # holds back re-emits without a state change.
            assert all(e.state == e.previous for e in emits)
            assert all(
                e.state in (State.PAIRING, State.CONNECTING)
                or (e.state is State.RECONNECTING and isinstance(event, Start) and e.held_s > 0)
                for e in emits
            )
            assert len(emits) <= 1
        for a in actions:
            if isinstance(a, StartTimer):
                assert a.delay_s >= 0
                slow = isinstance(event, Closed) and event.code in (D.UNAVAILABLE, D.RATE_LIMITED)
                if a.timer is Timer.RETRY and slow and isinstance(event, Closed):
                    assert a.delay_s >= (event.retry_after_ms or 0) / 1000
        if m.state is not State.OPEN:
            assert not (m.armed_timers & OPEN_ONLY)
        if m.state not in RETRY_STATES:
            assert Timer.RETRY not in m.armed_timers
        if m.state is State.RECONNECTING:
            assert Timer.RETRY in m.armed_timers
        assert m.attempt <= policy.max_attempts + 1
        assert (m.qr is not None) == (m.state is State.PAIRING)
