"""Slots move between Redis Cluster primaries while Sends flow: nothing is lost,
duplicated or reordered, counted at the upstream, and no client sees an error.

Every slot holding a live session's keys (its hash tag) moves to another
primary, a few keys at a time, while two broker processes deliver for twelve
sessions. Meanwhile the half-moved slot refuses any script whose keys are split
between the two nodes (TRYAGAIN) or that names a key not yet there; the store
must retry those refusals and never run a script that touches an undeclared key
(which Redis would refuse half-way through, after writes it cannot roll back).
"""

from __future__ import annotations

import asyncio

from redis.crc import key_slot

from broker.simulator import Simulator
from broker.store.redis import RedisKeys
from broker_client import BrokerClient, SendResult
from tests.cluster.conftest import RedisTarget
from tests.cluster.procs import ProcessFactory
from tests.cluster.test_scale_out import SIDS, all_open, lease_owners, no_overlaps, pair_all
from tests.helpers import eventually_async
from tests.redis_cluster import RedisClusterServers

AFTER_MIGRATION = 3
"""Sends per session after the last slot moved (delivery on the new primaries)."""
MAX_SENDS = 2000
"""Bound on each session's sends, whatever happens."""


async def test_slot_migration_under_load_loses_nothing(
    sim: Simulator, redis_cluster: RedisClusterServers, broker_processes: ProcessFactory
) -> None:
    # A short sent-message retention keeps each slot's key count (so its move) small.
    procs = [broker_processes(f"b{i}", redis_cluster.url, sim.url, "--lease-ttl", "5",
                              "--sent-retention", "2") for i in range(2)]
    r = RedisTarget(redis_cluster.url).client()
    async with BrokerClient(procs[0].address) as client:
        for sid in SIDS:
            await client.create_session(sid)
        await pair_all(sim, SIDS)
        await eventually_async(lambda: all_open(client, SIDS), 30, "every session OPEN")
    slots = sorted({key_slot(RedisKeys().outbox(sid).encode()) for sid in SIDS})
    before = {slot: redis_cluster.slot_owner(slot) for slot in slots}
    ports = [node.port for node in redis_cluster.nodes]
    tryagain_before = redis_cluster.error_count("TRYAGAIN")

    results: dict[str, list[SendResult]] = {sid: [] for sid in SIDS}
    migrated = asyncio.Event()
    started = asyncio.Event()

    async def worker(sid: str, client: BrokerClient) -> None:
        after = 0
        for n in range(MAX_SENDS):
            # Half with an idempotency key, half without (no idempotency record).
            key = f"{sid}-{n}" if n % 2 == 0 else ""
            results[sid].append(await client.send(sid, "+15550100", f"m{n}",
                                                  idempotency_key=key))
            if n == 3 and all(len(v) >= 3 for v in results.values()):
                started.set()
            if migrated.is_set():
                after += 1
                if after >= AFTER_MIGRATION:
                    return

    async def migrate() -> None:
        await asyncio.wait_for(started.wait(), 60)
        for slot in slots:  # each to the next primary: every one of them loses and gains
            to = ports[(ports.index(before[slot]) + 1) % len(ports)]
            await asyncio.to_thread(redis_cluster.migrate_slot, slot, to,
                                    keys_per_step=10, pause_s=0.05)
        migrated.set()

    # One attempt per Send: a slot migration must not surface as an error at all.
    clients = [BrokerClient(p.address, timeout=60, retry_attempts=1) for p in procs]
    try:
        await asyncio.gather(
            migrate(),
            *(worker(sid, clients[i % 2]) for i, sid in enumerate(SIDS)))
    finally:
        for c in clients:
            await c.close()

    assert all(redis_cluster.slot_owner(slot) != before[slot] for slot in slots)
    # The run met half-moved slots: scripts were refused, and retried.
    assert redis_cluster.error_count("TRYAGAIN") > tryagain_before
    for sid in SIDS:
        sent = [x.message_id for x in results[sid]]
        assert len(sent) > AFTER_MIGRATION and all(x.acked for x in results[sid]), sid
        # Exactly once, in the order each Send was acked.
        assert [m.id for m in sim.record(sid).accepted] == sent, sid
    no_overlaps(sim)
    assert None not in (await lease_owners(r, SIDS)).values()
    await r.aclose()
