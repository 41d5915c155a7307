"""Pure session diagnostics: counters the actor updates, and advice derived from them.

The actor owns a `SessionStats`, calls its `on_*` methods as things happen
(passing timestamps in; nothing here reads the clock), and asks `recommend`
what an operator should do. Both feed the `Health` RPC.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import GAVE_UP_PREFIX, PAIRING_TIMED_OUT, State

HOUR_S = 3600.0

#: Entering these ends any "reconnect" in progress: coming back from them is a
#: fresh start by a person, not a reconnect time worth averaging.
_RESETS_RECONNECT = frozenset({State.STOPPED, State.LOGGED_OUT, State.FAILED})


_UPSTREAM_REFUSED = frozenset({int(DisconnectCode.UNAVAILABLE), int(DisconnectCode.RATE_LIMITED)})


class Severity(StrEnum):
    INFO = "INFO"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Something an operator should know or do (`code` is machine-readable)."""

    severity: Severity
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change, as shown in `Health.recent`."""

    previous: State
    state: State
    reason: str
    code: int
    at: float


@dataclass(frozen=True, slots=True)
class Counters:
    """The proto's `Counters` message, field for field."""

    disconnects_last_hour: int
    connects_total: int
    disconnects_total: int
    reconnect_ms_mean: float
    reconnect_ms_last: float
    keepalive_sent: int
    keepalive_ok: int
    keepalive_success_rate: float
    messages_accepted: int
    messages_acked: int
    delivery_rate: float
    outbox_depth: int
    consecutive_failures: int


@dataclass
class SessionStats:
    """Running totals for one session; cheap to update, bounded in memory."""

    recent: deque[Transition] = field(default_factory=lambda: deque(maxlen=50))
    connects_total: int = 0
    #: Times the session left OPEN, for any reason.
    disconnects_total: int = 0
    keepalive_sent: int = 0
    keepalive_ok: int = 0
    messages_accepted: int = 0
    messages_acked: int = 0
    #: Timestamps of disconnects within the last hour (older ones are pruned).
    disconnect_times: deque[float] = field(default_factory=deque)
    #: Recent reconnect durations in ms (from leaving OPEN to OPEN again).
    reconnect_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    reconnect_ms_total: float = 0.0
    reconnects: int = 0
    left_open_at: float | None = None

    # -- updates --------------------------------------------------------------

    def on_transition(
        self, previous: State, state: State, reason: str, code: int, at: float
    ) -> None:
        """Record a state change at time `at` (seconds, any monotonic-ish clock)."""
        if previous == state:
            return  # a QR refresh, not a transition
        self.recent.append(Transition(previous, state, reason, code, at))
        if previous is State.OPEN:
            self.disconnects_total += 1
            self.disconnect_times.append(at)
            self._prune(at)
            self.left_open_at = at
        if state is State.OPEN:
            self.connects_total += 1
            if self.left_open_at is not None:
                ms = max(0.0, (at - self.left_open_at) * 1000.0)
                self.reconnect_ms.append(ms)
                self.reconnect_ms_total += ms
                self.reconnects += 1
            self.left_open_at = None
        elif state in _RESETS_RECONNECT:
            self.left_open_at = None

    def on_keepalive_sent(self) -> None:
        self.keepalive_sent += 1

    def on_keepalive_ok(self) -> None:
        self.keepalive_ok += 1

    def on_accepted(self, n: int = 1) -> None:
        self.messages_accepted += n

    def on_acked(self, n: int = 1) -> None:
        self.messages_acked += n

    # -- derived --------------------------------------------------------------

    def disconnects_last_hour(self, now: float) -> int:
        return sum(1 for t in self.disconnect_times if now - t < HOUR_S)

    @property
    def reconnect_ms_mean(self) -> float:
        return self.reconnect_ms_total / self.reconnects if self.reconnects else 0.0

    @property
    def reconnect_ms_last(self) -> float:
        return self.reconnect_ms[-1] if self.reconnect_ms else 0.0

    @property
    def keepalive_success_rate(self) -> float:
        """Pongs per ping; 1.0 before the first ping, so a new session looks healthy."""
        if not self.keepalive_sent:
            return 1.0
        return min(1.0, self.keepalive_ok / self.keepalive_sent)

    @property
    def delivery_rate(self) -> float:
        """Acked per accepted; 1.0 before the first message."""
        if not self.messages_accepted:
            return 1.0
        return min(1.0, self.messages_acked / self.messages_accepted)

    def counters(
        self, now: float, *, outbox_depth: int = 0, consecutive_failures: int = 0
    ) -> Counters:
        """Everything the proto's `Counters` needs, as of `now`."""
        return Counters(
            disconnects_last_hour=self.disconnects_last_hour(now),
            connects_total=self.connects_total,
            disconnects_total=self.disconnects_total,
            reconnect_ms_mean=self.reconnect_ms_mean,
            reconnect_ms_last=self.reconnect_ms_last,
            keepalive_sent=self.keepalive_sent,
            keepalive_ok=self.keepalive_ok,
            keepalive_success_rate=self.keepalive_success_rate,
            messages_accepted=self.messages_accepted,
            messages_acked=self.messages_acked,
            delivery_rate=self.delivery_rate,
            outbox_depth=outbox_depth,
            consecutive_failures=consecutive_failures,
        )

    def _prune(self, now: float) -> None:
        while self.disconnect_times and now - self.disconnect_times[0] >= HOUR_S:
            self.disconnect_times.popleft()


def recommend(
    state: State,
    stats: SessionStats,
    *,
    now: float,
    outbox_depth: int,
    reason: str,
    code: int,
    session_id: str = "<id>",
    unstable_disconnects_per_hour: int = 10,
    keepalive_min_pings: int = 5,
    keepalive_min_success: float = 0.9,
    outbox_backlog: int = 1000,
) -> list[Recommendation]:
    """What is wrong with the session and what to do, most urgent first.

    An empty list means healthy. Thresholds are parameters so tests and
    operators can tune them; defaults suit a chat session.
    """
    recs = _state_advice(state, reason, code, session_id)
    disconnects = stats.disconnects_last_hour(now)
    if disconnects > unstable_disconnects_per_hour:
        recs.append(
            Recommendation(
                Severity.WARNING,
                "UNSTABLE_CONNECTION",
                f"The connection dropped {disconnects} times in the last hour. Check the "
                "network path to the upstream and look for another client using this login.",
            )
        )
    if (
        stats.keepalive_sent >= keepalive_min_pings
        and stats.keepalive_success_rate < keepalive_min_success
    ):
        recs.append(
            Recommendation(
                Severity.WARNING,
                "KEEPALIVE_FAILING",
                f"Only {stats.keepalive_success_rate:.0%} of keep-alive pings were answered "
                f"({stats.keepalive_ok}/{stats.keepalive_sent}). The link is lossy or the "
                "upstream is overloaded; check latency to the upstream.",
            )
        )
    if outbox_depth >= outbox_backlog:
        recs.append(
            Recommendation(
                Severity.WARNING,
                "OUTBOX_BACKLOG",
                f"{outbox_depth} messages are waiting to be sent. They will go out once the "
                "session is OPEN; if it is OPEN already, the upstream is acking too slowly.",
            )
        )
    order = {Severity.CRITICAL: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(recs, key=lambda r: order[r.severity])  # stable: keeps insertion order


def _state_advice(state: State, reason: str, code: int, session_id: str) -> list[Recommendation]:
    """The recommendation that follows from the state alone (at most one)."""
    match state:
        case State.LOGGED_OUT:
            return [
                Recommendation(
                    Severity.CRITICAL,
                    "REPAIR_NEEDED",
                    "The login was logged out and its credentials were wiped. "
                    f"Scan a new QR: run `broker qr {session_id}`.",
                )
            ]
        case State.PAIRING:
            return [
                Recommendation(
                    Severity.WARNING,
                    "SCAN_QR",
                    "The session waits for its QR code to be scanned with the phone app. "
                    f"Show it with `broker qr {session_id}`.",
                )
            ]
        case State.CONFLICT:
            return [
                Recommendation(
                    Severity.CRITICAL,
                    "CONFLICTING_CLIENT",
                    "Another process outside the broker uses this login and replaced our "
                    "connection. Stop it (every process must go through the broker), then "
                    f"run `broker restart {session_id}`.",
                )
            ]
        case State.RECONNECTING if code in _UPSTREAM_REFUSED:
            return [
                Recommendation(
                    Severity.WARNING,
                    "UPSTREAM_UNAVAILABLE",
                    f"The upstream refused the connection ({reason}). The broker retries "
                    "with a longer backoff; nothing to do unless it lasts.",
                )
            ]
        case State.STOPPED:
            return [
                Recommendation(
                    Severity.INFO,
                    "STOPPED",
                    f"The session is stopped ({reason or 'not started'}). "
                    f"Run `broker restart {session_id}` to connect it.",
                )
            ]
        case State.FAILED:
            return [_failed_advice(reason, code, session_id)]
    return []


def _failed_advice(reason: str, code: int, session_id: str) -> Recommendation:
    if code == DisconnectCode.FORBIDDEN:
        return Recommendation(
            Severity.CRITICAL,
            "BANNED",
            "The upstream forbids this login (banned or blocked). Contact the upstream "
            "provider; retrying will not help.",
        )
    if code == DisconnectCode.BAD_SESSION:
        return Recommendation(
            Severity.CRITICAL,
            "BAD_SESSION",
            "The stored credentials were corrupt and have been wiped. Re-pair: run "
            f"`broker qr {session_id}` and scan the code.",
        )
    if reason == PAIRING_TIMED_OUT:
        return Recommendation(
            Severity.CRITICAL,
            "PAIRING_TIMED_OUT",
            "Nobody scanned the QR code in time. When someone is ready to scan, run "
            f"`broker qr {session_id}`.",
        )
    if reason.startswith(GAVE_UP_PREFIX):
        return Recommendation(
            Severity.CRITICAL,
            "GAVE_UP",
            f"The broker {reason} to connect. Check the network and the upstream's "
            f"status, then run `broker restart {session_id}`.",
        )
    return Recommendation(
        Severity.CRITICAL,
        "FAILED",
        f"The session failed ({reason or 'unknown reason'}) and needs a person. "
        f"Check the logs, then run `broker restart {session_id}`.",
    )
