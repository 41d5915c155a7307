"""Pure session diagnostics: counters the actor updates, and advice derived from them.

The actor owns a `SessionStats`, calls its `on_*` methods as things happen
(passing timestamps in; nothing here reads the clock), and asks `recommend`
what an operator should do. Both feed the `Health` RPC.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import (
    CREDENTIALS_UNREADABLE_PREFIX,
    ENDS_ANY_RECONNECT,
    GAVE_UP_PREFIX,
    PAIRING_TIMED_OUT,
    State,
)

HOUR_S = 3600.0
#: Attempts per minute and FLAPPING look back this far: recent enough to clear
#: soon after a storm calms, long enough to average a few attempts.
RECENT_S = 600.0
#: Cap on each per-hour history list (OPEN spans, gaps, attempts): an attempt
#: budget keeps a session far below it; past it the oldest entries go first.
MAX_POINTS = 4096

_T = TypeVar("_T")



_UPSTREAM_REFUSED = frozenset({int(DisconnectCode.UNAVAILABLE), int(DisconnectCode.RATE_LIMITED)})
#: States in which low availability is news: the others have their own advice.
_MEANT_TO_BE_UP = frozenset({State.OPEN, State.CONNECTING, State.RECONNECTING})


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
    #: Fraction of time OPEN over the last hour, counted from the first OPEN.
    availability_last_hour: float = 0.0
    #: Seconds `availability_last_hour` covers (up to an hour; 0 before the first OPEN).
    availability_window_s: float = 0.0
    #: Reconnect gaps (leaving OPEN to OPEN again) completed in the last hour, ms.
    reconnect_gap_ms_p50: float = 0.0
    reconnect_gap_ms_p99: float = 0.0
    reconnect_gap_ms_max: float = 0.0
    #: Connection attempts per minute over the last 10 minutes.
    attempts_per_minute: float = 0.0
    #: Attempts the attempt budget held back (spaced out) in the last hour.
    attempts_held_back_last_hour: int = 0
    #: Messages the upstream refused for good (not resent).
    messages_refused: int = 0
    #: Messages a delivered receipt came back for.
    messages_delivered: int = 0
    #: Delivered receipts per message the upstream took, over the last hour.
    delivered_rate_last_hour: float = 1.0


@dataclass
class SessionStats:
    """Running totals for one session; cheap to update, bounded in memory."""

    recent: deque[Transition] = field(default_factory=lambda: deque(maxlen=50))
    connects_total: int = 0
    #: Times the session left OPEN, for any reason.
    disconnects_total: int = 0
    keepalive_sent: int = 0
    keepalive_ok: int = 0
    #: The latest ping still waits for its pong (not missed yet: its timeout runs).
    keepalive_waiting: bool = False
    messages_accepted: int = 0
    messages_acked: int = 0
    messages_refused: int = 0
    messages_delivered: int = 0
    #: The latest refusal's (code, reason).
    last_refusal: tuple[int, str] | None = None
    #: Per minute of the last hour: [minute number, acked, delivered], oldest first.
    #: None until the first ack: ten thousand idle sessions carry no list.
    minutes: deque[list[int]] | None = None
    #: Timestamps of disconnects within the last hour (older ones are pruned).
    disconnect_times: deque[float] = field(default_factory=deque)
    #: Recent reconnect durations in ms (from leaving OPEN to OPEN again).
    reconnect_ms: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    reconnect_ms_total: float = 0.0
    reconnects: int = 0
    left_open_at: float | None = None
    #: The last hour, for availability, gaps and storms. None until first needed:
    #: ten thousand idle sessions should not carry empty lists.
    first_open_at: float | None = None
    open_since: float | None = None
    #: Ended OPEN spans (start, end), oldest first.
    open_spans: list[tuple[float, float]] | None = None
    #: Completed reconnect gaps (when OPEN again, ms), oldest first.
    gaps: list[tuple[float, float]] | None = None
    #: When each connection attempt started (every CONNECTING, a 515 restart too).
    attempt_times: list[float] | None = None
    #: When the attempt budget held an attempt back.
    held_times: list[float] | None = None

    # -- updates --------------------------------------------------------------

    def on_transition(
        self, previous: State, state: State, reason: str, code: int, at: float,
        *, held_s: float = 0.0,
    ) -> None:
        """Record a status change at time `at` (seconds, any monotonic-ish clock).

        Fed every `Emit`, also those that keep the state: entering CONNECTING is
        a connection attempt even from CONNECTING (the 515 restart), and
        `held_s` > 0 says the attempt budget held the next attempt back.
        """
        if state is State.CONNECTING:
            self.attempt_times = _appended(self.attempt_times, at, at - RECENT_S, _self)
        if held_s > 0:
            self.held_times = _appended(self.held_times, at, at - HOUR_S, _self)
        if previous == state:
            return  # a QR refresh, not a transition
        self.recent.append(Transition(previous, state, reason, code, at))
        if previous is State.OPEN:
            self.disconnects_total += 1
            self.disconnect_times.append(at)
            self._prune(at)
            self.left_open_at = at
            if self.open_since is not None:
                span = (self.open_since, at)
                self.open_spans = _appended(self.open_spans, span, at - HOUR_S, _end)
                self.open_since = None
        if state is State.OPEN:
            self.connects_total += 1
            if self.left_open_at is not None:
                ms = max(0.0, (at - self.left_open_at) * 1000.0)
                self.reconnect_ms.append(ms)
                self.reconnect_ms_total += ms
                self.reconnects += 1
                self.gaps = _appended(self.gaps, (at, ms), at - HOUR_S, _end_at)
            self.left_open_at = None
            self.open_since = at
            if self.first_open_at is None:
                self.first_open_at = at
        elif state in ENDS_ANY_RECONNECT:
            self.left_open_at = None

    def on_keepalive_sent(self) -> None:
        self.keepalive_sent += 1
        self.keepalive_waiting = True

    def on_keepalive_ok(self) -> None:
        self.keepalive_ok += 1
        self.keepalive_waiting = False

    def on_accepted(self, n: int = 1) -> None:
        self.messages_accepted += n

    def on_acked(self, n: int = 1, now: float | None = None) -> None:
        self.messages_acked += n
        if now is not None:
            self._minute(now)[1] += n

    def on_delivered(self, n: int = 1, now: float | None = None) -> None:
        self.messages_delivered += n
        if now is not None:
            self._minute(now)[2] += n

    def _minute(self, now: float) -> list[int]:
        minute = int(now // 60)
        if self.minutes is None:
            self.minutes = deque(maxlen=60)
        if not self.minutes or self.minutes[-1][0] != minute:
            self.minutes.append([minute, 0, 0])
        return self.minutes[-1]

    def delivered_rate(self, now: float) -> float:
        """Delivered receipts per message the upstream took (acked), over the last
        hour: what "> 95% delivered" measures; 1.0 before the first ack."""
        first = int(now // 60) - 59
        acked = delivered = 0
        for minute, a, d in self.minutes or ():
            if minute >= first:
                acked, delivered = acked + a, delivered + d
        return min(1.0, delivered / acked) if acked else 1.0

    def on_refused(self, code: int, reason: str) -> None:
        self.messages_refused += 1
        self.last_refusal = (code, reason)

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
    def keepalive_settled(self) -> int:
        """Pings answered or missed: all sent but one still waiting for its pong."""
        return self.keepalive_sent - self.keepalive_waiting

    @property
    def keepalive_success_rate(self) -> float:
        """Pongs per settled ping; 1.0 before the first, so a new session looks
        healthy. A ping in flight is not counted missed: on a busy process its pong
        may wait a while to be read, and counting it made sessions look lossy."""
        if not self.keepalive_settled:
            return 1.0
        return min(1.0, self.keepalive_ok / self.keepalive_settled)

    @property
    def delivery_rate(self) -> float:
        """Acked per accepted; 1.0 before the first message."""
        if not self.messages_accepted:
            return 1.0
        return min(1.0, self.messages_acked / self.messages_accepted)

    def availability(self, now: float) -> tuple[float, float]:
        """(fraction of time OPEN, seconds covered) over the last hour as of `now`.

        Counted from the first OPEN (waiting for a QR scan before it is not an
        outage); (0.0, 0.0) before that.
        """
        if self.first_open_at is None:
            return 0.0, 0.0
        start = max(self.first_open_at, now - HOUR_S)
        span = now - start
        open_s = 0.0 if self.open_since is None else now - max(self.open_since, start)
        for began, ended in self.open_spans or ():
            open_s += max(0.0, min(ended, now) - max(began, start))
        if span <= 0:
            return (1.0 if self.open_since is not None else 0.0), 0.0
        return min(1.0, open_s / span), span

    def reconnect_gaps_ms(self, now: float) -> list[float]:
        """Reconnect gaps completed in the last hour, oldest first, milliseconds."""
        return [ms for at, ms in self.gaps or () if now - at < HOUR_S]

    def attempts_within(self, now: float, window_s: float) -> int:
        return sum(1 for t in self.attempt_times or () if now - t < window_s)

    def attempts_per_minute(self, now: float) -> float:
        """Attempts per minute over the last 10 minutes (since the first attempt, if
        that is more recent, but at least over one minute)."""
        times = self.attempt_times
        if not times:
            return 0.0
        covered = min(RECENT_S, max(60.0, now - times[0]))
        return self.attempts_within(now, covered) * 60.0 / covered

    def held_within(self, now: float, window_s: float) -> int:
        """Attempts the attempt budget held back within the last `window_s`."""
        return sum(1 for t in self.held_times or () if now - t < window_s)

    def disconnects_within(self, now: float, window_s: float) -> int:
        return sum(1 for t in self.disconnect_times if now - t < window_s)

    def counters(
        self, now: float, *, outbox_depth: int = 0, consecutive_failures: int = 0
    ) -> Counters:
        """Everything the proto's `Counters` needs, as of `now`."""
        availability, window = self.availability(now)
        gaps = self.reconnect_gaps_ms(now)
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
            availability_last_hour=availability,
            availability_window_s=window,
            reconnect_gap_ms_p50=percentile(gaps, 0.5),
            reconnect_gap_ms_p99=percentile(gaps, 0.99),
            reconnect_gap_ms_max=max(gaps, default=0.0),
            attempts_per_minute=self.attempts_per_minute(now),
            attempts_held_back_last_hour=self.held_within(now, HOUR_S),
            messages_refused=self.messages_refused,
            messages_delivered=self.messages_delivered,
            delivered_rate_last_hour=self.delivered_rate(now),
        )

    def _prune(self, now: float) -> None:
        while self.disconnect_times and now - self.disconnect_times[0] >= HOUR_S:
            self.disconnect_times.popleft()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _self(t: float) -> float:
    return t


def _end(span: tuple[float, float]) -> float:
    return span[1]


def _end_at(gap: tuple[float, float]) -> float:
    return gap[0]


def _appended(
    items: list[_T] | None, item: _T, cutoff: float, when: Callable[[_T], float]
) -> list[_T]:
    """`items` (made if None) with `item` appended, entries with `when` <= cutoff
    dropped from the front (they are in time order), and at most MAX_POINTS kept."""
    if items is None:
        return [item]
    items.append(item)
    old = bisect.bisect_right(items, cutoff, key=when)
    excess = len(items) - MAX_POINTS
    if old or excess > 0:
        del items[: max(old, excess)]
    return items


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
    min_availability: float = 0.9,
    availability_min_window_s: float = 300.0,
) -> list[Recommendation]:
    """What is wrong with the session and what to do, most urgent first.

    An empty list means healthy. Thresholds are parameters so tests and
    operators can tune them; defaults suit a chat session.
    """
    recs = _state_advice(state, reason, code, session_id)
    flapping = _flapping_advice(stats, now)
    if flapping is not None:
        recs.append(flapping)
    if state in _MEANT_TO_BE_UP:
        availability, window = stats.availability(now)
        if window >= availability_min_window_s and availability < min_availability:
            recs.append(_availability_advice(stats, now, availability, window, code,
                                             flapping=flapping is not None))
    disconnects = stats.disconnects_last_hour(now)
    if disconnects > unstable_disconnects_per_hour and flapping is None:
        recs.append(
            Recommendation(
                Severity.WARNING,
                "UNSTABLE_CONNECTION",
                f"The connection dropped {disconnects} times in the last hour. Check the "
                "network path to the upstream and look for another client using this login.",
            )
        )
    if (
        stats.keepalive_settled >= keepalive_min_pings
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
    if stats.last_refusal is not None:
        code, why = stats.last_refusal
        recs.append(
            Recommendation(
                Severity.WARNING,
                "MESSAGES_REFUSED",
                f"The upstream refused {stats.messages_refused} message(s), the latest with "
                f"code {code} ({why}). Refused messages are not resent: their Sends fail with "
                "MESSAGE_REFUSED. Check the recipients (a number that is not on WhatsApp, a "
                "contact that blocked this one) and that this login may message them; many "
                "refusals in a row can precede a ban, so slow down before sending more.",
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


def _flapping_advice(stats: SessionStats, now: float) -> Recommendation | None:
    """FLAPPING once the attempt budget had to hold an attempt back recently."""
    held = stats.held_within(now, RECENT_S)
    if not held:
        return None
    drops = stats.disconnects_within(now, RECENT_S)
    attempts = stats.attempts_within(now, RECENT_S)
    every = f" (one every {RECENT_S / drops:.1f} s)" if drops else ""
    return Recommendation(
        Severity.WARNING,
        "FLAPPING",
        f"The connection keeps dropping soon after it opens: {drops} drops{every} and "
        f"{attempts} connection attempts in the last 10 minutes. To protect the login, "
        f"the broker spaced out {held} reconnect attempts (--attempt-burst / "
        "--attempt-rate). Check the network path to the upstream (a proxy, NAT or "
        "firewall cutting long-lived connections, an unstable link) and look for another "
        "client using this login.",
    )


def _availability_advice(
    stats: SessionStats, now: float, availability: float, window: float, code: int,
    *, flapping: bool,
) -> Recommendation:
    gaps = stats.reconnect_gaps_ms(now)
    shown = (f" (reconnect gaps p50 {percentile(gaps, 0.5) / 1000:.1f} s, p99 "
             f"{percentile(gaps, 0.99) / 1000:.1f} s, max {max(gaps) / 1000:.1f} s)"
             if gaps else "")
    if flapping:
        cause = "It keeps dropping right after it opens: see FLAPPING."
    elif code in _UPSTREAM_REFUSED:
        cause = "The upstream keeps refusing the connection: check its status."
    else:
        cause = ("Check that the upstream is reachable from this host and the network "
                 "path to it.")
    return Recommendation(
        Severity.WARNING,
        "LOW_AVAILABILITY",
        f"The session was OPEN only {availability:.0%} of the last {window / 60:.0f} "
        f"minutes{shown}. Messages wait in the outbox meanwhile. {cause}",
    )


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
    if code == DisconnectCode.MULTIDEVICE_MISMATCH:
        return Recommendation(
            Severity.CRITICAL,
            "MULTIDEVICE_MISMATCH",
            "The upstream no longer accepts this linked device (multi-device mismatch); its "
            f"keys have been wiped. Re-pair: run `broker restart {session_id}`, then "
            f"`broker qr {session_id}` (or `broker pair {session_id} --phone ...`).",
        )
    if code == DisconnectCode.CLIENT_OUTDATED:
        return Recommendation(
            Severity.CRITICAL,
            "CLIENT_OUTDATED",
            "WhatsApp rejected the client's web version as outdated (405). Pin a current "
            "one with `broker serve --wa-version <version>` (BROKER_WA_VERSION; the version "
            "WhatsApp Web shows now), then run "
            f"`broker restart {session_id}`. The credentials are kept.",
        )
    if reason.startswith(CREDENTIALS_UNREADABLE_PREFIX):
        return Recommendation(
            Severity.CRITICAL,
            "CREDENTIALS_UNREADABLE",
            f"The stored credentials cannot be decrypted: {reason.split(': ', 1)[0]}. "
            "Add that key (kid:key) back to BROKER_CREDENTIAL_KEYS (after the current "
            f"one), then run `broker restart {session_id}`; without the key, re-pair.",
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
