"""Session diagnostics: counters and recommendations."""

from __future__ import annotations

import pytest

from broker.lifecycle.health import Recommendation, SessionStats, Severity, recommend
from broker.lifecycle.states import LEASE_LOST, PAIRING_TIMED_OUT, State, gave_up_reason

NOW = 100_000.0


def codes(recs: list[Recommendation]) -> list[str]:
    return [r.code for r in recs]


def advise(
    state: State,
    stats: SessionStats | None = None,
    *,
    reason: str = "",
    code: int = 0,
    outbox_depth: int = 0,
) -> list[Recommendation]:
    return recommend(
        state,
        stats or SessionStats(),
        now=NOW,
        outbox_depth=outbox_depth,
        reason=reason,
        code=code,
        session_id="962302",
    )


# -- one recommendation per state ---------------------------------------------------


def test_open_and_connecting_are_healthy() -> None:
    assert advise(State.OPEN) == []
    assert advise(State.CONNECTING) == []
    assert advise(State.RECONNECTING, reason="connection closed", code=428) == []


@pytest.mark.parametrize(
    ("state", "reason", "code", "expected", "severity"),
    [
        (State.LOGGED_OUT, "logged out", 401, "REPAIR_NEEDED", Severity.CRITICAL),
        (State.PAIRING, "scan the QR code to pair", 0, "SCAN_QR", Severity.WARNING),
        (State.CONFLICT, "replaced", 440, "CONFLICTING_CLIENT", Severity.CRITICAL),
        (State.FAILED, "forbidden", 403, "BANNED", Severity.CRITICAL),
        (State.FAILED, "bad session", 500, "BAD_SESSION", Severity.CRITICAL),
        (State.FAILED, PAIRING_TIMED_OUT, 408, "PAIRING_TIMED_OUT", Severity.CRITICAL),
        (State.FAILED, gave_up_reason(101), 428, "GAVE_UP", Severity.CRITICAL),
        (State.FAILED, "something odd", 0, "FAILED", Severity.CRITICAL),
        (State.RECONNECTING, "service unavailable", 503, "UPSTREAM_UNAVAILABLE", Severity.WARNING),
        (State.RECONNECTING, "rate limited", 429, "UPSTREAM_UNAVAILABLE", Severity.WARNING),
        (State.STOPPED, "stopped", 0, "STOPPED", Severity.INFO),
        (State.STOPPED, LEASE_LOST, 0, "STOPPED", Severity.INFO),
    ],
)
def test_state_recommendation(
    state: State, reason: str, code: int, expected: str, severity: Severity
) -> None:
    recs = advise(state, reason=reason, code=code)
    assert codes(recs) == [expected]
    assert recs[0].severity is severity
    assert recs[0].message.endswith(".")


def test_messages_name_the_command_to_run() -> None:
    assert "`broker qr 962302`" in advise(State.LOGGED_OUT, code=401)[0].message
    assert "`broker qr 962302`" in advise(State.FAILED, code=500)[0].message
    gave_up = advise(State.FAILED, reason=gave_up_reason(4), code=428)[0].message
    assert "`broker restart 962302`" in gave_up and "network" in gave_up
    assert "Stop it" in advise(State.CONFLICT, code=440)[0].message


# -- condition recommendations ------------------------------------------------------


def test_unstable_connection_after_more_than_ten_disconnects_in_an_hour() -> None:
    stats = SessionStats()
    t = NOW - 3_000.0
    for _ in range(11):
        stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, t)
        stats.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, t + 1)
        t += 10.0
    assert codes(advise(State.OPEN, stats)) == ["UNSTABLE_CONNECTION"]
    assert "11 times" in advise(State.OPEN, stats)[0].message
    # An hour later they no longer count.
    later = recommend(State.OPEN, stats, now=NOW + 3_600.0, outbox_depth=0, reason="", code=0)
    assert later == []


def test_ten_disconnects_are_still_fine() -> None:
    stats = SessionStats()
    for i in range(10):
        stats.on_transition(State.OPEN, State.RECONNECTING, "x", 428, NOW - i)
    assert advise(State.OPEN, stats) == []


def test_keepalive_failing_needs_enough_pings() -> None:
    stats = SessionStats()
    for _ in range(4):
        stats.on_keepalive_sent()
    assert advise(State.OPEN, stats) == []  # 0 % of 4 pings: too few to judge
    stats.on_keepalive_sent()
    assert codes(advise(State.OPEN, stats)) == ["KEEPALIVE_FAILING"]
    for _ in range(5):
        stats.on_keepalive_ok()
    assert advise(State.OPEN, stats) == []


def test_keepalive_threshold_is_strictly_below() -> None:
    stats = SessionStats()
    for _ in range(10):
        stats.on_keepalive_sent()
    for _ in range(9):
        stats.on_keepalive_ok()
    assert stats.keepalive_success_rate == pytest.approx(0.9)
    assert advise(State.OPEN, stats) == []


def test_outbox_backlog() -> None:
    assert advise(State.OPEN, outbox_depth=999) == []
    assert codes(advise(State.OPEN, outbox_depth=1000)) == ["OUTBOX_BACKLOG"]
    custom = recommend(
        State.OPEN, SessionStats(), now=NOW, outbox_depth=50, reason="", code=0, outbox_backlog=50
    )
    assert codes(custom) == ["OUTBOX_BACKLOG"]


def test_most_urgent_first() -> None:
    recs = advise(State.STOPPED, outbox_depth=5_000, reason="stopped")
    assert codes(recs) == ["OUTBOX_BACKLOG", "STOPPED"]
    recs = advise(State.LOGGED_OUT, outbox_depth=5_000, code=401)
    assert codes(recs) == ["REPAIR_NEEDED", "OUTBOX_BACKLOG"]


# -- counters ---------------------------------------------------------------------


def test_counters_start_healthy() -> None:
    c = SessionStats().counters(NOW)
    assert (c.connects_total, c.disconnects_total, c.disconnects_last_hour) == (0, 0, 0)
    assert (c.keepalive_success_rate, c.delivery_rate) == (1.0, 1.0)
    assert (c.reconnect_ms_mean, c.reconnect_ms_last) == (0.0, 0.0)


def test_reconnect_durations_and_totals() -> None:
    s = SessionStats()
    s.on_transition(State.STOPPED, State.CONNECTING, "started", 0, 0.0)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 1.0)
    s.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, 10.0)
    s.on_transition(State.RECONNECTING, State.CONNECTING, "reconnecting", 0, 10.5)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 12.0)
    s.on_transition(State.OPEN, State.CONNECTING, "restart required", 515, 20.0)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 24.0)
    c = s.counters(30.0, outbox_depth=3, consecutive_failures=1)
    assert (c.connects_total, c.disconnects_total, c.disconnects_last_hour) == (3, 2, 2)
    assert c.reconnect_ms_last == pytest.approx(4_000.0)
    assert c.reconnect_ms_mean == pytest.approx(3_000.0)
    assert (c.outbox_depth, c.consecutive_failures) == (3, 1)
    assert [t.state for t in s.recent] == [
        State.CONNECTING, State.OPEN, State.RECONNECTING, State.CONNECTING,
        State.OPEN, State.CONNECTING, State.OPEN,
    ]  # fmt: skip


def test_a_stop_in_between_is_not_a_reconnect() -> None:
    s = SessionStats()
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 0.0)
    s.on_transition(State.OPEN, State.STOPPED, "stopped", 0, 5.0)
    s.on_transition(State.STOPPED, State.CONNECTING, "started", 0, 500.0)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 501.0)
    assert s.counters(600.0).reconnect_ms_last == 0.0
    assert s.disconnects_total == 1


def test_qr_refresh_is_not_a_transition_and_history_is_bounded() -> None:
    s = SessionStats()
    s.on_transition(State.PAIRING, State.PAIRING, "scan", 0, 1.0)
    assert len(s.recent) == 0
    for i in range(200):
        s.on_transition(State.CONNECTING, State.PAIRING, "scan", 0, float(i))
    assert len(s.recent) == 50
    assert s.recent[-1].at == 199.0


def test_disconnect_timestamps_are_pruned() -> None:
    s = SessionStats()
    for i in range(5_000):
        s.on_transition(State.OPEN, State.RECONNECTING, "x", 428, float(i * 60))
    assert len(s.disconnect_times) <= 61
    assert s.disconnects_last_hour(4_999 * 60.0) == 60


def test_rates() -> None:
    s = SessionStats()
    s.on_keepalive_sent()
    s.on_keepalive_sent()
    s.on_keepalive_ok()
    s.on_accepted(4)
    s.on_acked()
    s.on_acked(2)
    c = s.counters(0.0)
    assert (c.keepalive_sent, c.keepalive_ok, c.keepalive_success_rate) == (2, 1, 0.5)
    assert (c.messages_accepted, c.messages_acked, c.delivery_rate) == (4, 3, 0.75)
