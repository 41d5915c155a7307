"""The Redis store while a session's slot moves between cluster primaries.

A script that touches a key it did not declare is refused half-way through
by a migrating slot ("non local key"), after writes it cannot roll back; one
whose declared keys are split between the nodes is refused whole, up front
(TRYAGAIN), and the store retries it until the slot has moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from broker.store.base import NewMessage, OutboxBatch, SessionRecord
from broker.store.redis import RedisKeys, RedisStore
from tests.helpers import eventually
from tests.redis_cluster import RedisClusterServers, redis_cluster  # noqa: F401  (fixture)
from tests.store.conftest import open_redis

pytestmark = pytest.mark.redis

SID = "mig1"


@pytest.fixture
async def store(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:  # noqa: F811
    opened = open_redis(redis_cluster, consumer="owner")
    yield opened
    await opened.close()


async def test_outbox_write_waits_out_a_half_moved_slot(
    store: RedisStore, redis_cluster: RedisClusterServers,  # noqa: F811
) -> None:
    await store.create_session(SessionRecord(SID, "t"))
    fence = await store.new_fence(SID)
    first = await store.apply_outbox(SID, OutboxBatch(messages=[NewMessage("+1", "a", "k1")]),
                                     max_depth=100, at=1.0, fence=fence)
    [delivering] = await store.pending(SID, 10, fence=fence)
    slot = key_slot(RedisKeys().outbox(SID).encode())
    source = redis_cluster.slot_owner(slot)
    target = next(n.port for n in redis_cluster.nodes if n.port != source)
    refused = redis_cluster.error_count("TRYAGAIN")

    # The slot is migrating, no key moved yet: the ack's result and the new message's
    # idempotency record do not exist anywhere, the session's other keys are on the source.
    redis_cluster.begin_migration(slot, target)
    write = asyncio.create_task(store.apply_outbox(
        SID, OutboxBatch(acks=[delivering.message_id],
                         messages=[NewMessage("+1", "b", "k2"), NewMessage("+1", "c", "x", False)]),
        max_depth=100, at=2.0, fence=fence))
    # Refused more often than the cluster client's own attempts: the store retries on.
    beyond_client = refused + 2 * RedisCluster.RedisClusterRequestTTL
    await eventually(lambda: write.done() or redis_cluster.error_count("TRYAGAIN") > beyond_client,
                     20, "the write to be refused by the migrating slot, again and again")
    assert not write.done(), "a write that declares every key cannot run half-moved"
    await asyncio.to_thread(redis_cluster.finish_migration, slot, source, target)
    result = await asyncio.wait_for(write, 10)

    assert redis_cluster.slot_owner(slot) == target
    assert [r.message_id for r in result.acked] == [first.accepted[0].message.message_id]  # type: ignore[union-attr]
    assert [a.duplicate for a in result.accepted] == [False, False]  # type: ignore[union-attr]
    assert await store.outbox_depth(SID) == 2
    raw = redis_cluster.client()
    keys = RedisKeys()
    assert raw.pttl(keys.idem(SID, "k1")) > 0  # acked: its record now expires
    assert raw.pttl(keys.idem(SID, "k2")) == -1  # unacked: kept
    assert not raw.exists(keys.idem(SID, "x"))  # no key given: no record
    assert [m.body for m in await store.pending(SID, 10, fence=fence)] == ["b", "c"]
    raw.close()
