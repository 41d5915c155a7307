"""Retry delays, built from tenacity wait strategies.

tenacity's strategies take a `RetryCallState` and return seconds; they compose
with `+` (`wait_combine`). Two things do not fit the machine as they stand:
`wait_random*` draw from the global `random` (tests need a seeded
`random.Random`), and a real `RetryCallState` reads the clock when built (the
machine must not). So the jitter steps below are tiny tenacity strategies with
an injected rng, layered over tenacity's own `wait_exponential` / `wait_fixed`,
and `delay_for` asks them with a clock-free stand-in holding `attempt_number`.

`ReconnectDelay` picks the strategy by how the last connection ended
(`Outcome`): one that never opened escalates, one that opened and was then
dropped by the network is redialled promptly. Spacing out a run of prompt
redials is a separate rule (`storm.AttemptBudget`), composed with this one by
the machine: the delay here, then whatever the budget adds.
"""

from __future__ import annotations

import random
from enum import StrEnum
from typing import cast

from tenacity import RetryCallState
from tenacity.wait import WaitBaseT, wait_base, wait_exponential, wait_fixed


class _Attempt:
    """The only field tenacity's wait strategies read, without the clock read."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


def retry_state(attempt: int) -> RetryCallState:
    """A `RetryCallState` look-alike for attempt number `attempt` (1-based)."""
    return cast(RetryCallState, _Attempt(max(1, attempt)))


class wait_full_jitter(wait_base):  # lowercase: tenacity naming style
    """Full jitter: uniform in [0, window], where `window` is another strategy.

    Over `wait_exponential` this is tenacity's `wait_random_exponential`, with
    the randomness injectable.
    """

    def __init__(self, window: WaitBaseT, rng: random.Random) -> None:
        self.window = window
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.rng.uniform(0.0, float(self.window(retry_state)))


class wait_uniform(wait_base):  # lowercase: tenacity naming style
    """tenacity's `wait_random` (uniform in [low, high]) with an injected rng."""

    def __init__(self, low: float, high: float, rng: random.Random) -> None:
        self.low = low
        self.high = high
        self.rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.rng.uniform(self.low, self.high)


class wait_at_least(wait_base):  # lowercase: tenacity naming style
    """Never less than `floor` seconds: how a server's retry-after is honoured.

    `max` rather than `+`: the server said when it will be ready, so waiting
    that long is enough, and adding the backoff on top would only overshoot.
    """

    def __init__(self, floor: float, inner: WaitBaseT) -> None:
        self.floor = floor
        self.inner = inner

    def __call__(self, retry_state: RetryCallState) -> float:
        return max(self.floor, float(self.inner(retry_state)))


def exponential_full_jitter(initial_s: float, max_s: float, rng: random.Random) -> wait_base:
    """Uniform in [0, min(max_s, initial_s * 2**(attempt-1))] (AWS "full jitter")."""
    return wait_full_jitter(wait_exponential(multiplier=initial_s, max=max_s, exp_base=2), rng)


def backoff_strategy(
    initial_s: float,
    max_s: float,
    rng: random.Random,
    *,
    retry_after_s: float | None = None,
) -> wait_base:
    """The reconnect strategy: full-jitter exponential, floored by any retry-after."""
    strategy = exponential_full_jitter(initial_s, max_s, rng)
    if retry_after_s is not None and retry_after_s > 0:
        return wait_at_least(retry_after_s, strategy)
    return strategy


def delay_for(
    attempt: int,
    *,
    initial_s: float,
    max_s: float,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> float:
    """Seconds to wait before retry number `attempt` (1 = first retry).

    Bounds: 0 <= delay <= min(max_s, initial_s * 2**(attempt-1)), except that a
    positive `retry_after_s` raises the delay to at least `retry_after_s`.
    """
    strategy = backoff_strategy(initial_s, max_s, rng, retry_after_s=retry_after_s)
    return float(strategy(retry_state(attempt)))


def conflict_delay(base_s: float, rng: random.Random, *, jitter: float = 0.1) -> float:
    """`base_s` plus up to `jitter * base_s` at random, in [base_s, base_s*(1+jitter)].

    A long fixed wait after a conflict, spread a little so competing owners do
    not all reconnect at the same instant and kick each other again.
    """
    strategy = wait_fixed(base_s) + wait_uniform(0.0, base_s * jitter, rng)
    return float(strategy(retry_state(1)))


class Outcome(StrEnum):
    """How a connection ended, as far as the next delay is concerned."""

    #: It had opened (OPEN, or PAIRING with a QR shown), then the network dropped
    #: it (428 / 408 / 400): connecting works, so try again promptly.
    DROPPED = "DROPPED"
    #: It never opened: refused, timed out, closed during the handshake. Escalate.
    FAILED = "FAILED"
    #: The upstream refused service (503 / 429): escalate slower, honour retry-after.
    REFUSED = "REFUSED"


class ReconnectDelay:
    """Seconds before the next attempt, by `Outcome` and consecutive failures.

    - DROPPED: uniform in [0, redial_max_s], whatever the failure count: the
      small jitter only spreads sessions the same network blip dropped together.
    - FAILED: full-jitter exponential, `initial_s` doubling to `max_s`.
    - REFUSED: the same over the slow pair, at least any retry-after.
    """

    __slots__ = ("initial_s", "max_s", "redial_max_s", "rng", "slow_initial_s", "slow_max_s")

    def __init__(
        self,
        *,
        initial_s: float,
        max_s: float,
        slow_initial_s: float,
        slow_max_s: float,
        redial_max_s: float,
        rng: random.Random,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.slow_initial_s = slow_initial_s
        self.slow_max_s = slow_max_s
        self.redial_max_s = redial_max_s
        self.rng = rng

    def strategy(self, outcome: Outcome, *, retry_after_s: float | None = None) -> wait_base:
        """The tenacity wait strategy for `outcome` (asked with the failure count)."""
        match outcome:
            case Outcome.DROPPED:
                return wait_uniform(0.0, self.redial_max_s, self.rng)
            case Outcome.FAILED:
                return backoff_strategy(self.initial_s, self.max_s, self.rng)
            case Outcome.REFUSED:
                return backoff_strategy(
                    self.slow_initial_s, self.slow_max_s, self.rng, retry_after_s=retry_after_s
                )

    def __call__(
        self, outcome: Outcome, failures: int, *, retry_after_s: float | None = None
    ) -> float:
        """The delay after `failures` consecutive failed attempts ending in `outcome`."""
        return float(self.strategy(outcome, retry_after_s=retry_after_s)(retry_state(failures)))
