"""Baileys' disconnect codes (`lastDisconnect.error.output.statusCode`) through the
pure machine: one row per code, what the session does next, and whether the
login's credentials and keys are wiped. Event by event, no I/O."""

from __future__ import annotations

import pytest

from broker.lifecycle.actions import (
    Action,
    ClearCredentials,
    ClearKeys,
    Emit,
    OpenConnection,
    StartTimer,
    Timer,
)
from broker.lifecycle.health import SessionStats, Severity, recommend
from broker.lifecycle.inputs import Closed
from broker.lifecycle.reasons import DisconnectCode as D
from broker.lifecycle.reasons import parse_code
from broker.lifecycle.states import State
from tests.lifecycle.test_lifecycle_machine import drive_to


def _emit(actions: list[Action]) -> Emit:
    last = actions[-1]
    assert isinstance(last, Emit)
    return last


def _retry_in(actions: list[Action]) -> float | None:
    timers = [a.delay_s for a in actions if isinstance(a, StartTimer) and a.timer is Timer.RETRY]
    return timers[0] if timers else None


# code, state after a drop of an OPEN session, wipes credentials+keys, reconnects how
TABLE = [
    (401, State.LOGGED_OUT, True, "never"),
    (440, State.CONFLICT, False, "late"),
    (515, State.CONNECTING, False, "at once"),
    (428, State.RECONNECTING, False, "backoff"),
    (408, State.RECONNECTING, False, "backoff"),
    (503, State.RECONNECTING, False, "slow"),
    (500, State.FAILED, True, "never"),
    (411, State.FAILED, True, "never"),
    (403, State.FAILED, False, "never"),
    (405, State.FAILED, False, "never"),
]


@pytest.mark.parametrize(("code", "state", "wipes", "reconnect"), TABLE)
def test_each_baileys_code_from_an_open_session(
    code: int, state: State, wipes: bool, reconnect: str
) -> None:
    m = drive_to(State.OPEN)
    actions = m.handle(Closed(parse_code(code), ""))
    emitted = _emit(actions)
    assert (emitted.state, emitted.code) == (state, code)
    assert (ClearCredentials() in actions, ClearKeys() in actions) == (wipes, wipes)
    if wipes:  # keys go right after the credentials, before the state is published
        assert actions.index(ClearKeys()) == actions.index(ClearCredentials()) + 1
    opens = OpenConnection() in actions
    retry = _retry_in(actions)
    match reconnect:
        case "never":
            assert not opens and retry is None
        case "at once":
            assert opens and retry is None
        case "late":  # CONFLICT: only after the long conflict retry, never a loop
            assert m.policy.conflict_retry_s is not None
            assert not opens and retry is not None and retry >= m.policy.conflict_retry_s / 2
        case "backoff":  # a drop after OPEN is redialled within the redial bound
            assert opens or (retry is not None and retry <= m.policy.backoff_max_s)
        case "slow":
            assert not opens and retry is not None
            assert retry >= m.policy.slow_backoff_initial_s / 2


def test_403_says_banned_and_405_has_its_own_reason() -> None:
    banned = _emit(drive_to(State.OPEN).handle(Closed(D.FORBIDDEN, "Connection Failure")))
    assert banned.reason == "banned (Connection Failure)"
    outdated = _emit(drive_to(State.OPEN).handle(Closed(D.CLIENT_OUTDATED, "")))
    assert outdated.reason.startswith("client outdated")
    assert D.CLIENT_OUTDATED.text in _emit(
        drive_to(State.CONNECTING).handle(Closed(D.CLIENT_OUTDATED, "Connection Failure"))
    ).reason


def test_unknown_codes_count_as_a_lost_connection() -> None:
    assert parse_code(499) is D.CONNECTION_CLOSED
    assert parse_code(405) is D.CLIENT_OUTDATED and parse_code(411) is D.MULTIDEVICE_MISMATCH


@pytest.mark.parametrize(("code", "advice"), [(405, "CLIENT_OUTDATED"),
                                              (411, "MULTIDEVICE_MISMATCH"), (403, "BANNED")])
def test_health_explains_the_failed_codes(code: int, advice: str) -> None:
    [rec] = recommend(State.FAILED, SessionStats(), now=0.0, outbox_depth=0,
                      reason=D(code).text, code=code, session_id="962302")
    assert rec.code == advice and rec.severity is Severity.CRITICAL
    if code == 405:
        assert "--wa-version" in rec.message
