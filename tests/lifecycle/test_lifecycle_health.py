"""Session diagnostics: counters and recommendations."""

from __future__ import annotations

import pytest

from broker.lifecycle.health import (
    HOUR_S,
    MAX_POINTS,
    RECENT_S,
    Recommendation,
    SessionStats,
    Severity,
    recommend,
)
from broker.lifecycle.states import PAIRING_TIMED_OUT, State, gave_up_reason

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
        (State.STOPPED, "stopped", 0, "STOPPED", Severity.INFO),
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
    for _ in range(11):  # short outages: OPEN 99% of the time, not an availability problem
        stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, t)
        stats.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, t + 9.9)
        t += 10.0
    stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, t)
    assert codes(advise(State.OPEN, stats)) == ["UNSTABLE_CONNECTION"]
    assert "11 times" in advise(State.OPEN, stats)[0].message
    # An hour later they no longer count.
    later = recommend(State.OPEN, stats, now=NOW + 3_600.0, outbox_depth=0, reason="", code=0)
    assert later == []


def test_refused_messages_are_counted_and_advised_on() -> None:
    stats = SessionStats()
    stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, NOW - 10.0)
    assert advise(State.OPEN, stats) == []
    stats.on_refused(463, "WhatsApp refused the message")
    stats.on_refused(475, "WhatsApp refused the message")
    [rec] = advise(State.OPEN, stats)
    assert rec.code == "MESSAGES_REFUSED" and rec.severity == Severity.WARNING
    assert "2 message(s)" in rec.message and "code 475" in rec.message
    assert stats.counters(NOW).messages_refused == 2


def test_ten_disconnects_are_still_fine() -> None:
    stats = SessionStats()
    for i in range(10):
        stats.on_transition(State.OPEN, State.RECONNECTING, "x", 428, NOW - i)
    assert advise(State.OPEN, stats) == []


def test_keepalive_failing_needs_enough_pings() -> None:
    stats = SessionStats()
    for _ in range(5):
        stats.on_keepalive_sent()  # each one missed once the next is sent
    assert advise(State.OPEN, stats) == []  # 0 of 4 settled pings: too few to judge
    stats.on_keepalive_sent()
    assert codes(advise(State.OPEN, stats)) == ["KEEPALIVE_FAILING"]


def test_a_ping_waiting_for_its_pong_is_not_counted_missed() -> None:
    """On a busy process a pong may wait a while to be read: until its timeout,
    the ping in flight counts neither way."""
    stats = SessionStats()
    for _ in range(6):
        stats.on_keepalive_sent()
        stats.on_keepalive_ok()
    stats.on_keepalive_sent()
    assert stats.keepalive_success_rate == 1.0  # 6 of 6 settled (7 sent)
    assert advise(State.OPEN, stats) == []
    stats.on_keepalive_sent()  # the 7th was never answered
    assert stats.keepalive_success_rate == pytest.approx(6 / 7)
    assert codes(advise(State.OPEN, stats)) == ["KEEPALIVE_FAILING"]


def test_keepalive_threshold_is_strictly_below() -> None:
    stats = SessionStats()
    for n in range(10):
        stats.on_keepalive_sent()
        if n != 3:
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
    s.on_keepalive_sent()  # the first is missed
    s.on_keepalive_ok()
    s.on_accepted(4)
    s.on_acked()
    s.on_acked(2)
    c = s.counters(0.0)
    assert (c.keepalive_sent, c.keepalive_ok, c.keepalive_success_rate) == (2, 1, 0.5)
    assert (c.messages_accepted, c.messages_acked, c.delivery_rate) == (4, 3, 0.75)


# -- availability, reconnect gaps, attempts, storms ------------------------------------


def flap(stats: SessionStats, start: float, cycles: int, *, up_s: float, down_s: float,
         held_s: float = 0.0) -> float:
    """`cycles` rounds of OPEN for up_s, then down_s to reconnect; returns the end time."""
    t = start
    for _ in range(cycles):
        stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, t)
        t += up_s
        stats.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, t,
                            held_s=held_s)
        stats.on_transition(State.RECONNECTING, State.CONNECTING, "reconnecting", 0,
                            t + down_s / 2)
        t += down_s
    stats.on_transition(State.CONNECTING, State.OPEN, "connected", 0, t)
    return t


def test_availability_counts_from_the_first_open_over_the_last_hour() -> None:
    s = SessionStats()
    assert s.availability(NOW) == (0.0, 0.0)
    s.on_transition(State.STOPPED, State.CONNECTING, "started", 0, 0.0)
    s.on_transition(State.CONNECTING, State.PAIRING, "scan", 0, 1.0)
    s.on_transition(State.PAIRING, State.CONNECTING, "restart required", 515, 100.0)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 100.0)  # pairing: no outage
    s.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, 190.0)
    s.on_transition(State.RECONNECTING, State.CONNECTING, "reconnecting", 0, 195.0)
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 200.0)
    availability, window = s.availability(300.0)
    assert availability == pytest.approx(0.95) and window == 200.0
    # An hour on, the outage has left the window.
    assert s.availability(200.0 + HOUR_S) == (1.0, HOUR_S)
    s.on_transition(State.OPEN, State.STOPPED, "stopped", 0, 200.0 + HOUR_S)
    availability, window = s.availability(200.0 + 1.5 * HOUR_S)
    assert availability == pytest.approx(0.5) and window == HOUR_S


def test_reconnect_gaps_and_attempts_per_minute() -> None:
    s = SessionStats()
    s.on_transition(State.STOPPED, State.CONNECTING, "started", 0, 0.0)
    end = flap(s, 0.0, 100, up_s=2.5, down_s=0.5)  # 20 reconnects a minute for 5 minutes
    c = s.counters(end)
    assert c.reconnect_gap_ms_p50 == pytest.approx(500.0)
    assert c.reconnect_gap_ms_p99 == pytest.approx(500.0)
    assert c.reconnect_gap_ms_max == pytest.approx(500.0)
    assert c.attempts_per_minute == pytest.approx(20.0, rel=0.02)
    assert c.availability_last_hour == pytest.approx(2.5 / 3)
    assert c.attempts_held_back_last_hour == 0
    s.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, end + 1)
    s.on_transition(State.RECONNECTING, State.OPEN, "connected", 0, end + 31)
    c = s.counters(end + 31)
    assert c.reconnect_gap_ms_max == pytest.approx(30_000.0)
    # Nearest rank: one outlier in 101 gaps is the max, not the p99.
    assert c.reconnect_gap_ms_p50 == pytest.approx(500.0)
    assert c.reconnect_gap_ms_p99 == pytest.approx(500.0)
    # Ten quiet minutes later there were no attempts in the last ten minutes.
    assert s.counters(end + 31 + RECENT_S).attempts_per_minute == 0.0


def test_flapping_is_reported_with_how_often_and_what_to_check() -> None:
    s = SessionStats()
    end = flap(s, NOW - 300.0, 120, up_s=2.0, down_s=0.5, held_s=0.4)
    recs = recommend(State.OPEN, s, now=end, outbox_depth=0, reason="", code=0)
    # FLAPPING says all UNSTABLE_CONNECTION would; OPEN 80% of the time is low too.
    assert codes(recs) == ["FLAPPING", "LOW_AVAILABILITY"]
    assert "see FLAPPING" in recs[1].message
    message = recs[0].message
    assert "120 drops (one every 5.0 s)" in message
    assert "120 connection attempts" in message
    assert "spaced out 120 reconnect attempts" in message
    assert "network path" in message and "another client" in message
    assert s.counters(end).attempts_held_back_last_hour == 120
    # Ten calm minutes later the storm is over: no FLAPPING any more.
    calm = recommend(State.OPEN, s, now=end + RECENT_S, outbox_depth=0, reason="", code=0)
    assert "FLAPPING" not in codes(calm)


def test_low_availability_needs_a_long_enough_window() -> None:
    s = SessionStats()
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 0.0)
    s.on_transition(State.OPEN, State.RECONNECTING, "connection closed", 428, 60.0)
    s.on_transition(State.RECONNECTING, State.OPEN, "connected", 0, 120.0)
    assert recommend(State.OPEN, s, now=200.0, outbox_depth=0, reason="", code=0) == []
    recs = recommend(State.OPEN, s, now=400.0, outbox_depth=0, reason="", code=0)
    assert codes(recs) == ["LOW_AVAILABILITY"]
    assert "OPEN only 85% of the last 7 minutes" in recs[0].message
    assert "max 60.0 s" in recs[0].message
    # A person's states have their own advice; no availability warning on top.
    stopped = recommend(State.STOPPED, s, now=400.0, outbox_depth=0, reason="stopped", code=0)
    assert codes(stopped) == ["STOPPED"]


def test_histories_stay_bounded_under_a_long_storm() -> None:
    s = SessionStats()
    flap(s, 0.0, 20_000, up_s=0.1, down_s=0.1, held_s=0.05)
    for items in (s.open_spans, s.gaps, s.attempt_times, s.held_times):
        assert items is not None and len(items) <= MAX_POINTS


def test_idle_stats_carry_no_history_lists() -> None:
    s = SessionStats()
    s.on_transition(State.CONNECTING, State.OPEN, "connected", 0, 0.0)
    assert (s.open_spans, s.gaps, s.held_times) == (None, None, None)
