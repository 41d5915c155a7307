"""Riding out the original failure: the network drops every session every 0.3-1 s.

Twelve sessions (a bug that serialises over sessions hides behind one) flap
for a bounded time while a worker per session sends. What must hold, counted
at the upstream (the simulator's records) and in what the broker announces:

- every message delivered exactly once, in order, and acked to its worker;
- connection attempts never exceed the attempt budget (the storm bound);
- a connection that opened and dropped is announced with a short retry delay,
  never an escalating backoff, while connections keep opening;
- Health says the sessions are flapping, and reports their availability.

The lifecycle uses the default reconnect backoff (0.5 s doubling to 30 s), so
the old policy (a failure count reset only after 60 s open) would announce
growing delays here; the budget is small so that the bound is reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from dataclasses import replace

from broker.app import BrokerApp
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.states import SPACED_OUT, State
from broker.simulator import Simulator
from broker_client import BrokerClient, SendResult
from broker_client.v1 import broker_pb2 as pb
from tests.conftest import BrokerFactory
from tests.helpers import FAST_POLICY, eventually, paired_session, state_of

SESSIONS = [f"flap-{i:02d}" for i in range(12)]
FLAP_S = 6.0
REDIAL_MAX_S = 0.05
BURST, PER_MIN = 3, 30.0  # one attempt every 2 s past the burst: the drops outpace it
POLICY: LifecyclePolicy = replace(
    FAST_POLICY,
    backoff_initial_s=0.5, backoff_max_s=30.0,  # the defaults, so escalation would show
    redial_max_s=REDIAL_MAX_S, attempt_burst=BURST, attempt_rate_per_min=PER_MIN,
)


async def test_many_sessions_ride_out_drops_every_fraction_of_a_second(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker: BrokerApp = await make_broker(POLICY)
    for sid in SESSIONS:
        await paired_session(broker, sim, sid)

    events: list[pb.StatusEvent] = []
    results: dict[str, list[SendResult]] = defaultdict(list)
    async with BrokerClient(broker.address, timeout=60.0, retry_attempts=100) as client:
        watching = asyncio.Event()

        async def watch() -> None:
            async for event in client.watch_status(SESSIONS):
                if event.snapshot:
                    watching.set()
                else:
                    events.append(event)

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(watching.wait(), 10)

        # Every session is OPEN and idle: no attempt is in flight across t0.
        t0 = time.monotonic()
        before = {sid: sim.record(sid).connection_attempts for sid in SESSIONS}
        sim.set_faults(drop_min_s=0.3, drop_max_s=1.0)
        stop_sending = t0 + FLAP_S

        async def worker(sid: str) -> None:
            n = 0
            while time.monotonic() < stop_sending:
                n += 1
                results[sid].append(await client.send(
                    sid, "+15550100", f"{sid} message {n}", idempotency_key=f"{sid}-{n}"))

        try:
            await asyncio.wait_for(asyncio.gather(*(worker(s) for s in SESSIONS)), 90)
        finally:
            sim.set_faults()
        after = {sid: sim.record(sid).connection_attempts for sid in SESSIONS}
        t1 = time.monotonic()

        await eventually(lambda: all(state_of(broker, s) is State.OPEN for s in SESSIONS),
                         timeout=30, what="every session OPEN again")
        health = {h.session.session_id: h for h in await client.health(SESSIONS)}
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    # Enough drops to use up every session's burst (held sessions miss some drops).
    assert sum(sim.record(s).drops for s in SESSIONS) >= BURST * len(SESSIONS), "few drops"
    for sid in SESSIONS:
        sent = results[sid]
        record = sim.record(sid)
        # Delivered exactly once, in order, every one acked to its worker.
        assert sent and all(r.acked for r in sent), sid
        delivered = [m.id for m in record.accepted]
        assert len(delivered) == len(set(delivered)), f"{sid}: duplicate deliveries"
        assert delivered == [r.message_id for r in sorted(sent, key=lambda r: r.sequence)]

        # The storm bound, at the upstream: at most burst + rate x the time elapsed.
        attempts = after[sid] - before[sid]
        assert attempts <= BURST + PER_MIN * (t1 - t0) / 60, (sid, attempts, t1 - t0)

    reconnecting = [e for e in events if e.state == pb.RECONNECTING]
    held = [e for e in reconnecting if SPACED_OUT in e.reason]
    prompt = [e for e in reconnecting if e.previous_state == pb.OPEN and e not in held]
    assert held, "the drops outpace the budget: some attempts must have been spaced out"
    assert prompt
    # While connections keep opening, a drop is announced with the redial jitter only,
    # and never counts as a failure.
    assert max(e.retry_in_ms for e in prompt) <= REDIAL_MAX_S * 1000
    assert {e.attempt for e in prompt} == {0}
    # A spaced-out attempt waits at most for the budget's next token.
    assert max(e.retry_in_ms for e in held) <= (REDIAL_MAX_S + 60 / PER_MIN) * 1000 + 1

    for sid in {e.session_id for e in held}:
        h = health[sid]
        assert "FLAPPING" in [r.code for r in h.recommendations], sid
        assert h.counters.attempts_held_back_last_hour >= 1
    for sid in SESSIONS:
        c = health[sid].counters
        assert 0.0 < c.availability_last_hour < 1.0, sid
        assert c.availability_window_s > 0
        assert 0 < c.reconnect_gap_ms_p50 <= c.reconnect_gap_ms_p99 <= c.reconnect_gap_ms_max
        assert c.attempts_per_minute > 0
