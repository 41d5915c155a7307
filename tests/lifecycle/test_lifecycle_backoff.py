"""Backoff delays: full-jitter bounds, retry-after floor, determinism."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from tenacity.wait import wait_exponential, wait_fixed

from broker.lifecycle.backoff import (
    conflict_delay,
    delay_for,
    retry_state,
    wait_at_least,
    wait_full_jitter,
    wait_uniform,
)

attempts = st.integers(min_value=1, max_value=10_000)
initials = st.floats(min_value=0.001, max_value=60.0)
caps = st.floats(min_value=0.001, max_value=3_600.0)
seeds = st.integers(min_value=0, max_value=2**64)


@given(attempts, initials, caps, seeds)
def test_full_jitter_stays_within_the_exponential_window(
    attempt: int, initial: float, cap: float, seed: int
) -> None:
    cap = max(cap, initial)
    delay = delay_for(attempt, initial_s=initial, max_s=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= cap
    if attempt < 1000:  # 2**(n-1) overflows a float beyond this
        assert delay <= initial * 2 ** (attempt - 1)


@given(attempts, initials, caps, st.floats(min_value=0.0, max_value=10_000.0), seeds)
def test_retry_after_is_a_floor(
    attempt: int, initial: float, cap: float, retry_after: float, seed: int
) -> None:
    cap = max(cap, initial)
    delay = delay_for(
        attempt, initial_s=initial, max_s=cap, rng=random.Random(seed), retry_after_s=retry_after
    )
    assert delay >= retry_after
    assert delay <= max(retry_after, cap)


@given(attempts, seeds)
def test_same_seed_same_delays(attempt: int, seed: int) -> None:
    def run() -> list[float]:
        rng = random.Random(seed)
        return [
            delay_for(n, initial_s=0.5, max_s=30.0, rng=rng) for n in range(1, attempt % 20 + 2)
        ]

    assert run() == run()


def test_jitter_actually_spreads_delays() -> None:
    rng = random.Random(1)
    delays = {delay_for(5, initial_s=0.5, max_s=30.0, rng=rng) for _ in range(50)}
    assert len(delays) == 50
    assert min(delays) < 2.0 < max(delays) <= 8.0


def test_attempt_below_one_counts_as_the_first() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    assert delay_for(0, initial_s=0.5, max_s=30.0, rng=Top()) == 0.5


@given(st.floats(min_value=0.0, max_value=10_000.0), st.floats(0.0, 1.0), seeds)
def test_conflict_delay_band(base: float, jitter: float, seed: int) -> None:
    delay = conflict_delay(base, random.Random(seed), jitter=jitter)
    assert base <= delay <= base * (1 + jitter) + 1e-9


def test_strategies_compose_like_tenacity_ones() -> None:
    rng = random.Random(0)
    window = wait_exponential(multiplier=1, max=10)
    jitter = wait_full_jitter(window, rng)
    combined = wait_fixed(2) + wait_uniform(0.0, 0.0, rng)
    assert combined(retry_state(3)) == 2.0
    assert 0.0 <= jitter(retry_state(3)) <= 4.0
    assert wait_at_least(7.0, jitter)(retry_state(1)) == 7.0
