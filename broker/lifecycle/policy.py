"""Tunables of the lifecycle, kept apart from the logic so tests and config can vary them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LifecyclePolicy:
    """How hard and how fast the machine retries, and when it gives up."""

    #: First backoff window after an attempt that failed to connect (refused, timed
    #: out, closed in the handshake), doubling per failure up to `backoff_max_s`.
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: After a connection that had opened is dropped (428 / 408 / 400), the next
    #: attempt waits uniform [0, redial_max_s]: connecting works, the network took it.
    redial_max_s: float = 0.25
    #: Slower backoff for 429 / 503: the upstream asked us to go away for a while.
    slow_backoff_initial_s: float = 5.0
    slow_backoff_max_s: float = 300.0
    #: Delay before trying again after 440 (replaced); None: wait for an operator.
    conflict_retry_s: float | None = 300.0
    #: Attempt budget (the storm bound): at most `attempt_burst` connection attempts
    #: at once, refilled at `attempt_rate_per_min`; past it attempts are spaced out
    #: to that rate and Health says the session is flapping. 0 for either: no bound.
    #: 10 at once, one every 2 s sustained: a login that drops every few seconds
    #: is redialled at once, one that drops every second waits its turn.
    attempt_burst: int = 10
    attempt_rate_per_min: float = 30.0
    #: Consecutive failed attempts before FAILED (0 = never give up); an attempt that
    #: opens resets the count.
    max_attempts: int = 100
    #: Interval between keep-alive pings (None: keep-alive off).
    keepalive_interval_s: float | None = 15.0
    #: How long to wait for a pong before declaring the connection dead.
    keepalive_timeout_s: float = 10.0
    #: QR codes shown across pairing rounds before FAILED (0 = no limit).
    max_qr_codes: int = 10
    #: Extra random fraction added to `conflict_retry_s`, so several brokers
    #: that lost the same login do not all come back at the same instant.
    conflict_jitter: float = 0.1

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
        if self.attempt_burst < 0 or self.attempt_rate_per_min < 0:
            raise ValueError("attempt_burst and attempt_rate_per_min must be >= 0")
        if self.conflict_jitter < 0:
            raise ValueError("conflict_jitter must be >= 0")
