"""Brokers on a Sentinel-managed Redis with --durability replica: the primary is
SIGKILLed while workers send; after the Sentinels promote the replica (and the
old primary comes back as its replica), every message a worker was told was
accepted reaches the upstream exactly once, in order. Counted at the simulator.

The upstream refuses connections meanwhile, so accepted messages wait in the
outbox (in Redis) instead of being delivered at once, and the replica is cut off
(frozen behind full socket buffers) just before the kill, so the primary dies
holding writes no replica has: what was told accepted among those would be lost.
The brokers are SIGKILLed and restarted after the failover, so what they still
held in memory cannot stand in for what Redis lost.
"""

from __future__ import annotations

import asyncio
import signal

from broker.simulator import Simulator
from broker_client import BrokerClient, Unavailable
from tests.cluster.procs import ProcessFactory
from tests.cluster.test_scale_out import all_open, pair_all
from tests.helpers import eventually, eventually_async
from tests.redis_sentinel import SentinelGroup

SIDS = [f"v{i:02d}" for i in range(8)]
PER_SESSION = 20
KILL_AT = 5
WAIT_S = 120.0
DURABILITY = "replica"


async def test_primary_killed_mid_send_loses_nothing_accepted_with_replica_durability(
    sim: Simulator, sentinel_group: SentinelGroup, broker_processes: ProcessFactory
) -> None:
    group = sentinel_group
    procs = [broker_processes(f"b{i}", group.url, sim.url, "--lease-ttl", "2",
                              "--durability", DURABILITY) for i in range(2)]
    assert f"durability {DURABILITY}" in procs[0].log()
    async with BrokerClient(procs[0].address) as client:
        for sid in SIDS:
            await client.create_session(sid)
        await pair_all(sim, SIDS)
        await eventually_async(lambda: all_open(client, SIDS), 30, "every session OPEN")
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    for sid in SIDS:
        await sim.drop(sid)
    told: dict[str, list[str]] = {sid: [] for sid in SIDS}
    killed = asyncio.Event()
    recovered: list[asyncio.Task[None]] = []

    answered = [0]
    """Send attempts made while the replica was cut off and answered (told accepted,
    or refused as UNAVAILABLE)."""
    cut_off: list[str] = []
    """Message ids told accepted that were sent while no replica could get them."""
    cutting = [False]

    async def fail_over() -> None:
        assert group.replica is not None
        await asyncio.to_thread(group.cut_off_replica)
        try:
            cutting[0] = True
            # Writes the replica misses, each answered: with --durability replica
            # refused (no replica confirmed them), else told accepted.
            await eventually(lambda: answered[0] >= len(SIDS), 60,
                             "sends answered while the replica is cut off")
            old = group.primary.port
            group.primary.kill()
            cutting[0] = False
        finally:
            group.replica.thaw()
        await asyncio.to_thread(group.wait_promoted, old)
        # Back as the new primary's replica: without one, nothing could be accepted.
        await asyncio.to_thread(group.primary.start)

    async def send(sid: str, n: int, clients: list[BrokerClient]) -> str:
        """Until told accepted: the same key again after every UNAVAILABLE (bounded)."""
        for attempt in range(1000):
            via = clients[(n + attempt) % len(clients)]
            during = cutting[0]  # written after the cut-off, if this attempt writes
            try:
                result = await via.send(sid, "+15550100", f"{sid}-{n}",
                                        idempotency_key=f"{sid}-{n}", wait=False)
            except Unavailable:
                answered[0] += during
                await asyncio.sleep(0.05)
                continue
            answered[0] += during
            if during:
                cut_off.append(result.message_id)
            return result.message_id
        raise AssertionError(f"{sid}-{n} never accepted")

    async def worker(sid: str, clients: list[BrokerClient]) -> None:
        for n in range(PER_SESSION):
            told[sid].append(await send(sid, n, clients))
            if n == KILL_AT and not killed.is_set():
                killed.set()
                recovered.append(asyncio.create_task(fail_over()))

    clients = [BrokerClient(p.address, timeout=WAIT_S, retry_attempts=1) for p in procs]
    try:
        await asyncio.wait_for(asyncio.gather(*(worker(sid, clients) for sid in SIDS)), 240)
    finally:
        for c in clients:
            await c.close()
    await asyncio.gather(*recovered)
    assert killed.is_set()  # and fail_over saw the Sentinels promote the replica
    # Only what Redis kept counts: the owners' memory (their delivery windows) goes.
    for proc in procs:
        proc.signal(signal.SIGKILL)
        proc.wait()
    for proc in procs:
        await asyncio.to_thread(proc.start)
    sim.set_unavailable(503, count=0)
    await eventually(lambda: all(len(sim.record(s).accepted) >= PER_SESSION for s in SIDS),
                     60, "every told message at the upstream")
    # With --durability replica nothing sent while no replica could confirm it is
    # told accepted (with local, or WAIT ignored, some are: then they are lost).
    assert cut_off == [], cut_off
    for sid in SIDS:
        # Exactly once, in the order the worker was told each was accepted.
        assert [m.id for m in sim.record(sid).accepted] == told[sid], sid
