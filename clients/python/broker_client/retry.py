"""Tenacity retry policies shared by the async and sync clients.

Only UNAVAILABLE is retried: the broker's contract says it is the one code
where retrying (with the same idempotency key) is safe and can help. The
server's RetryInfo, when present, overrides our own backoff guess.
"""

from __future__ import annotations

import time

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .errors import BrokerError, ErrorReason, Unavailable, reason_name

__all__ = [
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_BACKOFF_MULTIPLIER",
    "is_reconnectable",
    "is_retryable",
    "reset_attempts",
    "send_retrying",
    "stream_retrying",
    "wait_retry_info",
]

#: First backoff step (seconds); doubles per attempt, plus jitter.
DEFAULT_BACKOFF_MULTIPLIER = 0.1
#: Longest backoff between two attempts (seconds).
DEFAULT_BACKOFF_MAX = 5.0


_TOO_SLOW = reason_name(ErrorReason.SUBSCRIBER_TOO_SLOW)


def is_retryable(exc: BaseException) -> bool:
    """Unary calls: retry UNAVAILABLE (NOT_DELIVERED_YET, STORE_UNAVAILABLE, transport)."""
    return isinstance(exc, Unavailable)


def is_reconnectable(exc: BaseException) -> bool:
    """Status streams: also resume after being dropped as too slow (we can catch up)."""
    if isinstance(exc, Unavailable):
        return True
    return (
        isinstance(exc, BrokerError)
        and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and exc.reason == _TOO_SLOW
    )


class wait_retry_info(wait_base):
    """Wait what the server's RetryInfo asks for, else fall back to ``fallback``."""

    def __init__(self, fallback: wait_base, *, max_wait: float = 60.0) -> None:
        self.fallback = fallback
        self.max_wait = max_wait

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and outcome.failed:
            exc = outcome.exception()
            if isinstance(exc, BrokerError) and exc.retry_after is not None:
                return min(exc.retry_after, self.max_wait)
        return float(self.fallback(retry_state))


def _backoff(multiplier: float, maximum: float) -> wait_base:
    return wait_retry_info(
        wait_exponential_jitter(multiplier=multiplier, max=maximum, jitter=multiplier)
    )


def send_retrying(
    *,
    attempts: int,
    budget: float,
    multiplier: float = DEFAULT_BACKOFF_MULTIPLIER,
    maximum: float = DEFAULT_BACKOFF_MAX,
) -> AsyncRetrying:
    """Bounded by attempts AND by the total time budget: never sleeps past the budget."""
    stop: stop_base = stop_after_attempt(max(1, attempts)) | stop_before_delay(budget)
    return AsyncRetrying(
        stop=stop,
        wait=_backoff(multiplier, maximum),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )


def stream_retrying(
    *,
    attempts: int,
    multiplier: float = DEFAULT_BACKOFF_MULTIPLIER,
    maximum: float = DEFAULT_BACKOFF_MAX,
) -> AsyncRetrying:
    """Reconnect policy for one outage of a status stream (see :func:`reset_attempts`)."""
    return AsyncRetrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=_backoff(multiplier, maximum),
        retry=retry_if_exception(is_reconnectable),
        reraise=True,
    )


def reset_attempts(retry_state: RetryCallState) -> None:
    """Start a fresh outage: an attempt that delivered events counts as a success."""
    retry_state.attempt_number = 1
    retry_state.start_time = time.monotonic()
    retry_state.idle_for = 0.0
