"""The two reconnect policies, alone and composed in the machine, pattern by pattern.

No I/O and no sleeps: a virtual clock fires the machine's RETRY timer when it
is due and stamps every event with `now`, the way the session actor does.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.lifecycle.actions import Action, CancelTimer, Emit, OpenConnection, StartTimer, Timer
from broker.lifecycle.backoff import Outcome, ReconnectDelay
from broker.lifecycle.inputs import Closed, Connected, Event, Paired, Start, TimerFired
from broker.lifecycle.machine import SessionMachine
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.reasons import DisconnectCode as D
from broker.lifecycle.states import SPACED_OUT, State
from broker.lifecycle.storm import AttemptBudget


class MaxRng(random.Random):
    """Jitter always picks the top of its range: the worst case, exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


POLICY = LifecyclePolicy(keepalive_interval_s=None)  # the defaults: 10 at once, 30 a minute
BURST, PER_MIN = POLICY.attempt_burst, POLICY.attempt_rate_per_min


def within_bound(attempts: list[float], burst: int, per_minute: float) -> bool:
    """Every span [a, b] of the attempt times holds at most burst + rate * (b - a)."""
    return all(
        j - i + 1 <= burst + per_minute * (attempts[j] - attempts[i]) / 60 + 1e-6
        for i in range(len(attempts))
        for j in range(i, len(attempts))
    )


@dataclass
class Clocked:
    """A machine on a virtual clock, and a record of what it asked for."""

    policy: LifecyclePolicy = POLICY
    now: float = 0.0
    retry_at: float | None = None
    attempts: list[float] = field(default_factory=list)
    emits: list[Emit] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.m = SessionMachine(self.policy, rng=MaxRng())

    def feed(self, event: Event) -> list[Action]:
        actions = self.m.handle(event, now=self.now)
        for a in actions:
            if isinstance(a, StartTimer) and a.timer is Timer.RETRY:
                self.retry_at = self.now + a.delay_s
            elif isinstance(a, CancelTimer) and a.timer is Timer.RETRY:
                self.retry_at = None
            elif isinstance(a, OpenConnection):
                self.attempts.append(self.now)
            elif isinstance(a, Emit):
                self.emits.append(a)
        return actions

    def retry(self) -> None:
        """Let time run to the RETRY timer and fire it (again, if it re-arms quietly)."""
        while self.m.state is State.RECONNECTING:
            assert self.retry_at is not None
            self.now, self.retry_at = self.retry_at, None
            self.feed(TimerFired(Timer.RETRY))

    def open_session(self) -> None:
        self.feed(Start())
        self.retry()
        self.feed(Connected())
        assert self.m.state is State.OPEN

    def drop_and_reconnect(self, code: D = D.CONNECTION_CLOSED) -> Emit:
        """The network drops the OPEN connection; the redial succeeds at once."""
        self.feed(Closed(code))
        drop = self.emits[-1]
        self.retry()
        self.feed(Connected())
        assert self.m.state is State.OPEN
        return drop


# -- the attempt budget alone ------------------------------------------------------


def test_budget_allows_a_burst_then_spaces_attempts_to_the_refill_rate() -> None:
    budget = AttemptBudget(burst=3, per_minute=60)
    assert [budget.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert budget.hold(0.0) == pytest.approx(1.0)  # one token a second
    assert budget.hold(0.4) == pytest.approx(0.6)
    assert budget.take(1.0)
    assert not budget.take(1.5)
    assert budget.take(2.0)


def test_budget_refills_to_its_burst_and_no_further() -> None:
    budget = AttemptBudget(burst=3, per_minute=60)
    for _ in range(3):
        budget.take(0.0)
    assert budget.tokens(1.5) == pytest.approx(1.5)
    assert budget.tokens(100.0) == 3.0
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_budget_never_runs_time_backwards() -> None:
    budget = AttemptBudget(burst=1, per_minute=60)
    assert budget.take(10.0)
    assert budget.tokens(5.0) == 0.0  # an older timestamp refills nothing
    assert not budget.take(5.0)


@pytest.mark.parametrize(("burst", "per_minute"), [(0, 30.0), (10, 0.0)])
def test_a_zero_budget_is_no_bound(burst: int, per_minute: float) -> None:
    budget = AttemptBudget(burst, per_minute)
    assert not budget.enabled
    assert all(budget.take(0.0) for _ in range(1000))
    assert budget.hold(0.0) == 0.0


@given(
    st.integers(1, 20),
    st.floats(1.0, 600.0),
    st.lists(st.floats(0.0, 30.0), min_size=1, max_size=80),
)
def test_attempts_the_budget_lets_through_stay_within_its_bound(
    burst: int, per_minute: float, gaps: list[float]
) -> None:
    budget, now, taken = AttemptBudget(burst, per_minute), 0.0, []
    for gap in gaps:
        now += gap
        if budget.take(now):
            taken.append(now)
        else:
            assert budget.hold(now) > 0
    assert within_bound(taken, burst, per_minute)


# -- the reconnect delay alone ------------------------------------------------------


def delays(rng: random.Random | None = None) -> ReconnectDelay:
    return ReconnectDelay(initial_s=0.5, max_s=30.0, slow_initial_s=5.0, slow_max_s=300.0,
                          redial_max_s=0.25, rng=rng or MaxRng())


@given(st.integers(0, 10_000), st.integers(0, 2**32))
def test_a_drop_after_open_waits_only_the_redial_jitter_whatever_came_before(
    failures: int, seed: int
) -> None:
    assert 0.0 <= delays(random.Random(seed))(Outcome.DROPPED, failures) <= 0.25


def test_failures_escalate_to_the_cap_and_refusals_honour_retry_after() -> None:
    d = delays()
    assert [d(Outcome.FAILED, n) for n in (1, 2, 3, 8, 50)] == [0.5, 1.0, 2.0, 30.0, 30.0]
    assert [d(Outcome.REFUSED, n) for n in (1, 2, 10)] == [5.0, 10.0, 300.0]
    assert d(Outcome.REFUSED, 1, retry_after_s=42.0) == 42.0


# -- composed in the machine, pattern by pattern -------------------------------------


def test_isolated_drop_is_redialled_within_the_redial_jitter() -> None:
    c = Clocked()
    c.open_session()
    c.now += 3600.0  # an hour of calm
    dropped_at = c.now
    drop = c.drop_and_reconnect()
    assert (drop.state, drop.retry_in_s, drop.held_s, drop.attempt) == (
        State.RECONNECTING, 0.25, 0.0, 0)
    assert c.attempts[-1] - dropped_at == 0.25
    assert SPACED_OUT not in drop.reason


def test_drops_every_few_seconds_are_always_redialled_promptly() -> None:
    """The reported pattern (drops every 1-5 s), at its mean: never spaced out."""
    c = Clocked()
    c.open_session()
    drops = []
    while c.now < 600.0:
        c.now += 3.0
        drops.append(c.drop_and_reconnect())
    assert {(d.retry_in_s, d.held_s, d.attempt) for d in drops} == {(0.25, 0.0, 0)}


def test_flapping_every_second_is_spaced_out_to_the_budget_and_never_backed_off() -> None:
    c = Clocked()
    c.open_session()
    drops = []
    while c.now < 120.0:
        c.now += 1.0
        drops.append(c.drop_and_reconnect())
    assert within_bound(c.attempts, BURST, PER_MIN)
    held = [d for d in drops if d.held_s > 0]
    assert held, "48 attempts a minute is over the budget of 30"
    assert all(SPACED_OUT in d.reason for d in held)
    # Spaced out to the refill rate, never escalated towards the 30 s cap.
    assert max(d.retry_in_s or 0 for d in drops) <= 0.25 + 60 / PER_MIN + 1e-9
    assert {d.attempt for d in drops} == {0}
    late = c.attempts[len(c.attempts) // 2:]
    assert min(b - a for a, b in itertools.pairwise(late)) >= 60 / PER_MIN - 1e-9


def test_connection_refused_repeatedly_escalates_to_the_cap() -> None:
    c = Clocked(LifecyclePolicy(keepalive_interval_s=None, max_attempts=0))
    c.feed(Start())
    retries = []
    for _ in range(12):
        c.feed(Closed(D.CONNECTION_CLOSED, "cannot connect: connection refused"))
        retries.append(c.emits[-1])
        c.retry()
    assert [e.retry_in_s for e in retries] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30, 30]
    assert [e.attempt for e in retries] == list(range(1, 13))
    assert all(e.held_s == 0 for e in retries)  # escalation alone keeps under the budget


@pytest.mark.parametrize("opened", [False, True])
def test_unavailable_with_retry_after_waits_at_least_that_even_after_open(opened: bool) -> None:
    c = Clocked()
    if opened:
        c.open_session()
    else:
        c.feed(Start())
    c.feed(Closed(D.UNAVAILABLE, "try later", retry_after_ms=20_000))
    emit = c.emits[-1]
    # A refusal is not a drop: slow backoff, a failure counted, the server's floor kept.
    assert (emit.state, emit.retry_in_s, emit.attempt) == (State.RECONNECTING, 20.0, 1)


def test_a_storm_hits_the_attempt_bound_then_recovers_when_it_calms() -> None:
    c = Clocked()
    c.open_session()
    storm = []
    while c.now < 60.0:  # opens and drops at once, again and again
        c.now += 0.1
        storm.append(c.drop_and_reconnect())
    assert within_bound(c.attempts, BURST, PER_MIN)
    assert len(c.attempts) <= BURST + PER_MIN * c.now / 60 + 1
    assert storm[-1].held_s > 0 and SPACED_OUT in storm[-1].reason
    # Calm: the connection holds for five minutes; the budget refills.
    c.now += 300.0
    assert c.m.budget.tokens(c.now) == BURST
    after = [c.drop_and_reconnect() for _ in range(BURST - 1)]
    assert {(d.retry_in_s, d.held_s) for d in after} == {(0.25, 0.0)}


def test_operator_starts_and_pairing_restarts_spend_the_same_budget() -> None:
    c = Clocked(LifecyclePolicy(keepalive_interval_s=None, attempt_burst=2,
                                attempt_rate_per_min=60))
    c.feed(Start())  # t=0: one of two tokens
    c.feed(Closed(D.CONNECTION_CLOSED, "refused"))
    c.retry()  # t=0.5: the second (1.5 there, one token a second)
    c.feed(Closed(D.REPLACED))
    # An operator restart with the budget spent waits for it, in RECONNECTING.
    c.feed(Start())
    assert c.emits[-1].state is State.RECONNECTING
    assert c.emits[-1].held_s == pytest.approx(0.5)
    assert SPACED_OUT in c.emits[-1].reason
    c.retry()
    assert c.m.state is State.CONNECTING
    # So does the restart after pairing (515), which otherwise goes at once.
    c.feed(Paired({"token": "t"}))
    c.feed(Closed(D.RESTART_REQUIRED))
    assert c.emits[-1].state is State.RECONNECTING
    assert c.emits[-1].held_s == pytest.approx(1.0)
    c.retry()
    assert c.m.state is State.CONNECTING
    assert len(c.attempts) == 4
    assert within_bound(c.attempts, 2, 60)


def test_a_retry_timer_that_fires_before_the_refill_waits_quietly_for_it() -> None:
    c = Clocked(LifecyclePolicy(keepalive_interval_s=None, attempt_burst=1,
                                attempt_rate_per_min=60))
    c.open_session()
    c.feed(Closed(D.CONNECTION_CLOSED))
    assert c.retry_at == pytest.approx(1.0)  # 0.25 s jitter, held to the refill at 1 s
    c.now = 0.5  # too early, as a late-planned delay could be
    [rearmed] = c.m.handle(TimerFired(Timer.RETRY), now=c.now)
    assert isinstance(rearmed, StartTimer) and rearmed.timer is Timer.RETRY
    assert rearmed.delay_s == pytest.approx(0.5)
    assert c.m.state is State.RECONNECTING
