"""Several broker processes on one Redis: one owner per session at all times,
balanced, failover on SIGKILL, handover on SIGTERM, self-fencing on SIGSTOP."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import redis.asyncio as aioredis

from broker.simulator import Simulator
from broker.store.redis import RedisKeys
from broker_client import BrokerClient, SendResult
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.conftest import RedisTarget
from tests.cluster.procs import BrokerProcess, ProcessFactory
from tests.helpers import eventually, eventually_async


async def lease_owners(r: aioredis.Redis, session_ids: list[str]) -> dict[str, str | None]:
    async with r.pipeline(transaction=False) as pipe:  # one GET per slot, also on a cluster
        for sid in session_ids:
            pipe.get(RedisKeys().lease(sid))
        values = await pipe.execute()
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


async def test_three_instances_share_thirty_sessions_without_conflict(
    sim: Simulator, redis_target: RedisTarget, broker_processes: ProcessFactory
) -> None:
    procs = [broker_processes(f"b{i}", redis_target.url, sim.url, "--lease-ttl", "2")
             for i in range(3)]
    r = redis_target.client()
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


SIDS = [f"h{i:02d}" for i in range(12)]
"""Every fault test runs many sessions: a bug that serialises over them hides behind one."""


async def start_fleet(sim: Simulator, redis_url: str, factory: ProcessFactory, ttl: str,
                      ) -> tuple[list[BrokerProcess], aioredis.Redis]:
    """Two instances sharing SIDS, every session paired and OPEN, both owning some."""
    procs = [factory(f"b{i}", redis_url, sim.url, "--lease-ttl", ttl) for i in range(2)]
    r = RedisTarget(redis_url).client()
    async with BrokerClient(procs[0].address) as client:
        for sid in SIDS:
            await client.create_session(sid)
        await pair_all(sim, SIDS)
        await eventually_async(lambda: all_open(client, SIDS), 30, "every session OPEN")

    async def both_own() -> bool:
        return len(set((await lease_owners(r, SIDS)).values()) - {None}) == 2

    await eventually_async(both_own, 30, "both instances owning sessions")
    return procs, r


def no_overlaps(sim: Simulator) -> None:
    for sid in SIDS:
        record = sim.record(sid)
        assert record.overlaps == [] and record.max_concurrent == 1, (sid, record.overlaps)


async def test_sigkill_owner_loses_nothing_accepted(
    sim: Simulator, redis_target: RedisTarget, broker_processes: ProcessFactory
) -> None:
    procs, r = await start_fleet(sim, redis_target.url, broker_processes, "2")
    victim, survivor = procs
    results: dict[str, list[SendResult]] = {sid: [] for sid in SIDS}
    killed = asyncio.Event()

    async def worker(sid: str, client: BrokerClient) -> None:
        for n in range(60):
            results[sid].append(await client.send(sid, "+15550100", f"m{n}",
                                                  idempotency_key=f"{sid}-{n}"))
            if n == 20 and not killed.is_set():
                killed.set()
                victim.signal(signal.SIGKILL)

    async with BrokerClient(survivor.address, timeout=60, retry_attempts=100) as client:
        await asyncio.gather(*(worker(sid, client) for sid in SIDS))
    victim.wait()
    assert set((await lease_owners(r, SIDS)).values()) == {survivor.name}
    for sid in SIDS:
        # Exactly once, in the order the worker was told each was accepted.
        assert [m.id for m in sim.record(sid).accepted] == [x.message_id for x in results[sid]]
    no_overlaps(sim)
    await r.aclose()


async def test_graceful_shutdown_hands_over_before_the_ttl(
    sim: Simulator, redis_target: RedisTarget, broker_processes: ProcessFactory
) -> None:
    # A 60 s lease: waiting for it to expire would blow the bounded wait below.
    procs, r = await start_fleet(sim, redis_target.url, broker_processes, "60")
    victim, survivor = procs
    victim.signal(signal.SIGTERM)
    assert victim.wait() == 0

    async def moved() -> bool:
        return set((await lease_owners(r, SIDS)).values()) == {survivor.name}

    await eventually_async(moved, 15, "the survivor to take every lease")
    async with BrokerClient(survivor.address) as client:
        await eventually_async(lambda: all_open(client, SIDS), 15, "OPEN on the survivor")
        for sid in SIDS:
            assert (await client.send(sid, "+15550100", "after handover")).acked
    assert sum(sim.record(sid).conflicts for sid in SIDS) == 0
    no_overlaps(sim)
    await r.aclose()


async def test_frozen_owner_fences_itself_and_never_fights(
    sim: Simulator, redis_target: RedisTarget, broker_processes: ProcessFactory
) -> None:
    procs, r = await start_fleet(sim, redis_target.url, broker_processes, "2")
    frozen, survivor = procs
    held = [sid for sid, owner in (await lease_owners(r, SIDS)).items() if owner == frozen.name]
    frozen.signal(signal.SIGSTOP)
    # Its connections die while it is frozen: on waking it will see plain network
    # drops, the kind of close that normally means "reconnect".
    for sid in held:
        assert await sim.drop(sid)
    try:
        async def moved() -> bool:
            return set((await lease_owners(r, SIDS)).values()) == {survivor.name}

        await eventually_async(moved, 20, "the survivor to take the expired leases")
        async with BrokerClient(survivor.address) as client:
            await eventually_async(lambda: all_open(client, SIDS), 20, "OPEN on the survivor")
    finally:
        frozen.signal(signal.SIGCONT)
    # On waking it fences itself, then rejoins and takes its share again through
    # new leases; a broker that trusted its stale leases would fight the survivor.
    await eventually(lambda: "fencing myself" in frozen.log(), 20)

    async def rebalanced() -> bool:
        return len(set((await lease_owners(r, SIDS)).values()) - {None}) == 2

    await eventually_async(rebalanced, 30, "the woken instance owning sessions again")
    async with BrokerClient(survivor.address) as client:
        await eventually_async(lambda: all_open(client, SIDS), 20, "every session OPEN")
    assert frozen.alive
    no_overlaps(sim)
    await r.aclose()
