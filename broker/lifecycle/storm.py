"""The attempt budget: a bound on one login's connection attempts, whatever their cause.

The reconnect delays (`backoff.py`) say how soon to try again after one close;
they cannot see a pattern across closes. A link that opens and drops every
second would be redialled promptly every second for ever. This token bucket
is the separate rule that protects the upstream from that: at most `burst`
attempts at once, refilled at `per_minute`, so any span of T seconds holds at
most `burst + per_minute * T / 60` attempts. Past it, attempts are spaced out
to the refill rate rather than refused: the session keeps trying, slower.

Pure like the machine that owns it: time comes in as arguments (seconds on
any monotonic clock), nothing here reads a clock.
"""

from __future__ import annotations

#: Float slack when a token is due "now": a timer may fire a clock tick early.
_EPSILON = 1e-6


class AttemptBudget:
    """A token bucket over connection attempts; `burst` or `per_minute` 0: no bound."""

    __slots__ = ("_at", "_tokens", "burst", "per_minute")

    def __init__(self, burst: int, per_minute: float) -> None:
        if burst < 0 or per_minute < 0:
            raise ValueError("attempt budget burst and rate must be >= 0")
        self.burst = burst
        self.per_minute = per_minute
        self._tokens = float(burst)
        #: When `_tokens` was last brought up to date (None: never used, bucket full).
        self._at: float | None = None

    @property
    def enabled(self) -> bool:
        return self.burst > 0 and self.per_minute > 0

    def tokens(self, at: float) -> float:
        """Attempts that could go at once at time `at` (fractions refill over time)."""
        if self._at is None or at <= self._at:
            return self._tokens
        return min(float(self.burst), self._tokens + (at - self._at) * self.per_minute / 60.0)

    def hold(self, at: float) -> float:
        """Seconds after `at` before an attempt fits the budget (0: it fits at `at`)."""
        if not self.enabled:
            return 0.0
        missing = 1.0 - self.tokens(at)
        if missing <= _EPSILON:
            return 0.0
        return missing * 60.0 / self.per_minute

    def take(self, at: float) -> bool:
        """Spend one attempt at time `at` if the budget allows it; False: `hold(at)` first."""
        if not self.enabled:
            return True
        tokens = self.tokens(at)
        if tokens < 1.0 - _EPSILON:
            return False
        self._tokens = max(0.0, tokens - 1.0)
        self._at = at if self._at is None else max(at, self._at)
        return True
