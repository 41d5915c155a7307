"""Long runs the default suite skips (`scripts/test.sh -m soak`): a randomized
nemesis for minutes, and the ownership and delivery guarantees still hold.

`BROKER_SOAK_SECONDS` sets the length (120 s by default); docs/reliability.md
has the last long run's output and the command.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from broker.simulator import Simulator
from tests.cluster.procs import ProcessFactory
from tests.cluster.test_scale_out import lease_owners
from tests.faults.fleet import Fleet
from tests.helpers import eventually_async
from tests.redis_server import RedisServer

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]
SOAK_SECONDS = float(os.environ.get("BROKER_SOAK_SECONDS", "120"))
SESSIONS = [f"soak{i:02d}" for i in range(24)]
TTL = 2.0
NAMES = ["a", "b", "c"]


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """Every write fsynced before Redis answers, so a SIGKILL of Redis loses nothing
    accepted (what the README's "what survives what" table promises)."""
    server = RedisServer(appendonly=True, extra_args=("--appendfsync", "always")).start()
    try:
        yield server
    finally:
        server.close()


async def test_randomized_nemesis_loses_duplicates_reorders_and_overlaps_nothing(
    sim: Simulator, durable_redis: RedisServer, broker_processes: ProcessFactory
) -> None:
    """Three instances, the upstream dropping every 1-5 s, and every few seconds one of:
    an instance SIGKILLed and restarted, paused, cut off from Redis, or its Redis
    link stalled; Redis itself stalled or killed and restarted. One sequential
    sender per session all along."""
    rng = random.Random(int(os.environ.get("BROKER_SOAK_SEED", "7")))
    fleet = Fleet(sim, durable_redis, broker_processes, ttl=TTL)
    faults: Counter[str] = Counter()
    paused: set[str] = set()
    try:
        await fleet.start(NAMES)
        await fleet.create_and_pair(SESSIONS)
        sim.set_faults(drop_min_s=1.0, drop_max_s=5.0)
        fleet.start_senders(SESSIONS)
        deadline = time.monotonic() + SOAK_SECONDS
        while time.monotonic() < deadline - 10:
            await asyncio.sleep(rng.uniform(3, 8))
            fault = rng.choice(["kill", "pause", "partition", "stall", "redis-stall",
                                "redis-kill"])
            name = rng.choice(NAMES)
            instance = fleet.instances[name]
            hold = rng.uniform(1.5, 3.0) * TTL
            faults[fault] += 1
            if fault == "kill":
                instance.proc.signal(signal.SIGKILL)
                await asyncio.to_thread(instance.proc.wait)
                await fleet.launch(name)
            elif fault == "pause":
                paused.add(f"broker/{name}")
                instance.proc.signal(signal.SIGSTOP)
                await asyncio.sleep(hold)
                instance.proc.signal(signal.SIGCONT)
            elif fault in ("partition", "stall"):
                (instance.proxy.blackhole if fault == "partition" else instance.proxy.stall)()
                await asyncio.sleep(hold)
                instance.proxy.heal()
            elif fault == "redis-stall":
                durable_redis.freeze()
                await asyncio.sleep(rng.uniform(0.5, 1.5) * TTL)
                durable_redis.thaw()
            else:
                durable_redis.kill()
                await asyncio.to_thread(durable_redis.start)
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        sim.set_faults()
        await fleet.wait_all_open(SESSIONS, 120)

        async def all_owned() -> bool:
            return None not in (await lease_owners(fleet.redis, SESSIONS)).values()

        await eventually_async(all_owned, 60, "every session owned")
        await fleet.stop_senders()
        await fleet.wait_delivered(SESSIONS, 120)

        problems = fleet.delivery_problems(SESSIONS)
        overlaps = fleet.broker_overlaps(SESSIONS)
        frozen = [o for o in overlaps if o.older in paused]
        told = sum(len(fleet.logs[s].told) for s in SESSIONS)
        accepted = sum(len(sim.record(s).accepted) for s in SESSIONS)
        bodies = [m.body for s in SESSIONS for m in sim.record(s).accepted]
        print(
            f"\nsoak: {SOAK_SECONDS:.0f}s, {len(SESSIONS)} sessions, 3 instances, "
            f"faults {dict(sorted(faults.items()))}, "
            f"{sum(sim.record(s).drops for s in SESSIONS)} upstream drops\n"
            f"soak: told {told}, upstream accepted {accepted}, "
            f"lost or reordered sessions {len(problems)}, "
            f"duplicated {len(bodies) - len(set(bodies))}, "
            f"conflicts (440) {fleet.conflicts(SESSIONS)}, "
            f"overlaps {len(overlaps) - len(frozen)} "
            f"(+{len(frozen)} of paused owners' own connections), "
            f"send errors retried {sum(fleet.logs[s].errors for s in SESSIONS)}"
        )
        assert problems == []
        assert len(bodies) == len(set(bodies))
        assert [o for o in overlaps if o.older not in paused] == []
        assert all(len(fleet.logs[s].told) > 10 for s in SESSIONS), "sent too little"
    finally:
        await fleet.close()
