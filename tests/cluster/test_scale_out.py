"""Several broker processes on one Redis: one owner per session at all times,
balanced, failover on SIGKILL, handover on SIGTERM, self-fencing on SIGSTOP."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import redis.asyncio as aioredis

from broker.simulator import Simulator
from broker_client import BrokerClient, SendResult
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.procs import BrokerProcess, ProcessFactory
from tests.helpers import eventually_async
from tests.redis_server import RedisServer

SID = "962302"


async def lease_owners(r: aioredis.Redis, session_ids: list[str]) -> dict[str, str | None]:
    values = await r.mget([f"broker:{{s:{sid}}}:lease" for sid in session_ids])
    return {sid: (_text(v).rsplit(":", 1)[0] if v else None)
            for sid, v in zip(session_ids, values, strict=True)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def pair_all(sim: Simulator, session_ids: list[str], timeout: float = 30.0) -> None:
    """Scan each session's QR as soon as its owner has opened a pairing connection."""
    pending = set(session_ids)

    async def scanned() -> bool:
        for sid in list(pending):
            if await sim.scan(sid):
                pending.discard(sid)
        return not pending

    await eventually_async(scanned, timeout, "every session to show a QR")


async def all_open(client: BrokerClient, session_ids: list[str]) -> bool:
    states = {s.session_id: s.state for s in await client.list_sessions()}
    return all(states.get(sid) == pb.OPEN for sid in session_ids)


async def start_pair(sim: Simulator, redis_url: str, factory: ProcessFactory, ttl: str,
                     ) -> tuple[list[BrokerProcess], aioredis.Redis]:
    procs = [factory(f"b{i}", redis_url, sim.url, "--lease-ttl", ttl) for i in range(2)]
    r = aioredis.Redis.from_url(redis_url)
    async with BrokerClient(procs[0].address) as client:
        await client.create_session(SID)
        await pair_all(sim, [SID])
        await eventually_async(lambda: all_open(client, [SID]), 20, "the session to open")
    return procs, r


async def roles(procs: list[BrokerProcess], r: aioredis.Redis) -> tuple[BrokerProcess, ...]:
    """(owner of SID, the other instance)."""
    owner_name = (await lease_owners(r, [SID]))[SID]
    owner = next(p for p in procs if p.name == owner_name)
    return owner, next(p for p in procs if p is not owner)


async def test_three_instances_share_thirty_sessions_without_conflict(
    sim: Simulator, redis_server: RedisServer, broker_processes: ProcessFactory
) -> None:
    procs = [broker_processes(f"b{i}", redis_server.url, sim.url, "--lease-ttl", "2")
             for i in range(3)]
    r = aioredis.Redis.from_url(redis_server.url)
    sids = [f"s{i:02d}" for i in range(30)]

    async def three_live() -> bool:
        return int(await r.zcard("broker:instances")) == 3

    await eventually_async(three_live, 20, "three live instances")
    async with BrokerClient(procs[0].address) as client:
        for sid in sids:
            await client.create_session(sid)
        await pair_all(sim, sids)
        await eventually_async(lambda: all_open(client, sids), 30, "all sessions open")
        # Keep running a while: sends through every instance, renewals, rebalancing.
        for round_ in range(3):
            for i, sid in enumerate(sids):
                async with BrokerClient(procs[i % 3].address) as worker:
                    assert (await worker.send(sid, "+15550100", f"r{round_}")).acked

    owners = await lease_owners(r, sids)
    assert None not in owners.values(), owners
    load = Counter(owners.values())
    assert max(load.values()) <= 15, load
    for sid in sids:
        record = sim.record(sid)
        assert record.conflicts == 0, (sid, record)
        assert record.max_concurrent == 1, (sid, record)
        assert [m.body for m in record.accepted] == ["r0", "r1", "r2"]
    await r.aclose()


async def test_sigkill_owner_loses_nothing_accepted(
    sim: Simulator, redis_server: RedisServer, broker_processes: ProcessFactory
) -> None:
    procs, r = await start_pair(sim, redis_server.url, broker_processes, "2")
    owner, survivor = await roles(procs, r)

    results: list[SendResult] = []
    async with BrokerClient(survivor.address, timeout=60, retry_attempts=100) as worker:
        for n in range(150):
            results.append(await worker.send(SID, "+15550100", f"m{n}",
                                             idempotency_key=f"k{n}"))
            if n == 40:
                owner.signal(signal.SIGKILL)
    owner.wait()
    assert (await lease_owners(r, [SID]))[SID] == survivor.name
    record = sim.record(SID)
    # Exactly once, in the order the worker was told each was accepted.
    assert [m.id for m in record.accepted] == [res.message_id for res in results]
    assert record.max_concurrent == 1
    await r.aclose()


async def test_graceful_shutdown_hands_over_before_the_ttl(
    sim: Simulator, redis_server: RedisServer, broker_processes: ProcessFactory
) -> None:
    # A 60 s lease: waiting for it to expire would blow the bounded wait below.
    procs, r = await start_pair(sim, redis_server.url, broker_processes, "60")
    owner, survivor = await roles(procs, r)
    owner.signal(signal.SIGTERM)
    assert owner.wait() == 0

    async def moved() -> bool:
        return (await lease_owners(r, [SID]))[SID] == survivor.name

    await eventually_async(moved, 15, "the survivor to take the lease")
    async with BrokerClient(survivor.address) as client:
        await eventually_async(lambda: all_open(client, [SID]), 15, "OPEN on the survivor")
        assert (await client.send(SID, "+15550100", "after handover")).acked
    record = sim.record(SID)
    assert record.conflicts == 0 and record.max_concurrent == 1
    await r.aclose()


async def test_frozen_owner_fences_itself_and_never_reconnects(
    sim: Simulator, redis_server: RedisServer, broker_processes: ProcessFactory
) -> None:
    procs, r = await start_pair(sim, redis_server.url, broker_processes, "2")
    owner, survivor = await roles(procs, r)

    owner.signal(signal.SIGSTOP)
    # Its connection dies while it is frozen: on waking it will see a plain
    # network drop, the kind of close that normally means "reconnect".
    assert await sim.drop(SID)
    try:
        async def moved() -> bool:
            return (await lease_owners(r, [SID]))[SID] == survivor.name

        await eventually_async(moved, 20, "the survivor to take the expired lease")
        async with BrokerClient(survivor.address) as client:
            await eventually_async(lambda: all_open(client, [SID]), 20, "OPEN on the survivor")
        attempts = sim.record(SID).connection_attempts
    finally:
        owner.signal(signal.SIGCONT)
    # Several lease TTLs after waking up: a broker that trusted its stale lease
    # would have reconnected (and fought the survivor) by now.
    await asyncio.sleep(3 * 2)
    assert owner.alive
    record = sim.record(SID)
    assert record.connection_attempts == attempts
    assert record.max_concurrent == 1
    assert (await lease_owners(r, [SID]))[SID] == survivor.name
    async with BrokerClient(survivor.address) as client:
        assert (await client.get_session(SID)).state == pb.OPEN
    await r.aclose()
