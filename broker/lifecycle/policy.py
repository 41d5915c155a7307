"""Tunables of the lifecycle, kept apart from the logic so tests and config can vary them."""

from __future__ import annotations

from dataclasses import dataclass

from broker.flags import setting


@dataclass(frozen=True)
class LifecyclePolicy:
    """How hard and how fast the machine retries, and when it gives up."""

    backoff_initial_s: float = setting(
        0.5, "First reconnect backoff ceiling after a failed attempt, seconds.")
    """After an attempt that failed to connect (refused, timed out, closed in the
    handshake); the window doubles per failure up to backoff_max_s."""
    backoff_max_s: float = setting(30.0, "Reconnect backoff cap, seconds.")
    redial_max_s: float = setting(
        0.25, "A connection that had opened and dropped is redialled after a random 0 to "
              "this many seconds.", minimum=0)
    """After 428 / 408 / 400 on a connection that had opened: connecting works, the
    network took it, so no escalating backoff."""
    slow_backoff_initial_s: float = setting(5.0, "Backoff after 503/429, seconds.")
    """The upstream asked us to go away for a while."""
    slow_backoff_max_s: float = setting(300.0, "Backoff cap after 503/429, seconds.")
    conflict_retry_s: float | None = setting(
        300.0, "Retry after a 440 conflict, seconds (0: never).", zero_is_none=True)
    """None: wait for an operator."""
    attempt_burst: int = setting(
        10, "Connection attempts per session at once before they are spaced out (0: no "
            "bound).", minimum=0)
    """The storm bound: at most `attempt_burst` attempts at once, refilled at
    `attempt_rate_per_min`; past it attempts are spaced out to that rate and Health
    says the session is flapping. 10 at once, one every 2 s sustained: a login that
    drops every few seconds is redialled at once, one that drops every second waits."""
    attempt_rate_per_min: float = setting(
        30.0, "Sustained connection attempts per session per minute past the burst (0: no "
              "bound).", name="--attempt-rate", minimum=0)
    max_attempts: int = setting(
        100, "Failed attempts in a row before FAILED (0: never).")
    """An attempt that opens resets the count."""
    keepalive_interval_s: float | None = setting(
        15.0, "Keep-alive ping interval, seconds (0: off).", zero_is_none=True)
    keepalive_timeout_s: float = setting(
        10.0, "Missed pong after this long reconnects, seconds.")
    keepalive_slack_s: float = setting(
        0.25, "A keep-alive ping may go up to this much late, so that the pings of many "
              "sessions share one wake of the event loop, seconds (at most a tenth of the "
              "interval; 0: on time).", minimum=0)
    """Every ping on its own exact deadline woke the loop once per ping and once per
    pong: 10,000 idle sessions cost a tenth of a core (docs/benchmarks.md, "Idle
    sessions")."""
    max_qr_codes: int = setting(
        10, "QR codes shown across pairing rounds before FAILED (0: no limit).")
    conflict_jitter: float = setting(
        0.1, "Random fraction added to --conflict-retry, so brokers that lost the same "
             "login do not all come back at once.", minimum=0)

    def __post_init__(self) -> None:
        if self.backoff_initial_s <= 0 or self.slow_backoff_initial_s <= 0:
            raise ValueError("backoff initial delays must be positive")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        if self.slow_backoff_max_s < self.slow_backoff_initial_s:
            raise ValueError("slow_backoff_max_s must be >= slow_backoff_initial_s")
        if self.conflict_retry_s is not None and self.conflict_retry_s < 0:
            raise ValueError("conflict_retry_s must be >= 0 or None")
        if self.max_attempts < 0 or self.max_qr_codes < 0:
            raise ValueError("max_attempts and max_qr_codes must be >= 0")
        if self.keepalive_interval_s is not None and self.keepalive_interval_s <= 0:
            raise ValueError("keepalive_interval_s must be positive or None")
        if self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive_timeout_s must be positive")
        if self.redial_max_s < 0:
            raise ValueError("redial_max_s must be >= 0")
        if self.keepalive_slack_s < 0:
            raise ValueError("keepalive_slack_s must be >= 0")
        if self.attempt_burst < 0 or self.attempt_rate_per_min < 0:
            raise ValueError("attempt_burst and attempt_rate_per_min must be >= 0")
        if self.conflict_jitter < 0:
            raise ValueError("conflict_jitter must be >= 0")
