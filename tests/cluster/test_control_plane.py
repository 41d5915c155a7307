"""The per-instance control plane against a real Redis: leases without TTLs taken
over by compare-and-set, a heartbeat that never revives a lapsed claim, and the
per-instance inbox that replaces outbox polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from broker.cluster.inbox import Inbox
from broker.cluster.lease import LeaseClient
from broker.cluster.membership import Membership
from broker.store.redis.keys import RedisKeys
from tests.redis_server import RedisServer, shared_redis, shared_redis_server  # noqa: F401

KEYS = RedisKeys()


@pytest.fixture
async def client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    server: RedisServer = request.getfixturevalue("shared_redis")
    r = aioredis.Redis(host="127.0.0.1", port=server.port)
    yield r
    await r.aclose()


async def test_a_lease_has_no_ttl_and_is_taken_over_only_from_the_value_judged(
    client: aioredis.Redis,
) -> None:
    b0 = LeaseClient(client, keys=KEYS, instance_id="b0")
    b1 = LeaseClient(client, keys=KEYS, instance_id="b1")
    first = await b0.acquire("s1")
    assert first is not None
    assert await client.pttl(KEYS.lease("s1")) == -1  # lives with b0's claim, not a TTL
    assert await b1.acquire("s1") is None  # held: '' no longer matches
    assert await b1.acquire("s1", "b0:1") is None  # not the value there
    taken = await b1.acquire("s1", first.value)
    assert taken is not None and taken.token > first.token
    assert await b0.acquire("s1", first.value) is None  # a second taker loses the race
    await b0.release(first)  # a stale release is a no-op
    assert await b1.holder("s1") == "b1"


async def test_a_lapsed_claim_is_never_revived_by_its_heartbeat(client: aioredis.Redis) -> None:
    m = Membership(client, keys=KEYS, instance_id="b0", ttl_s=5.0)
    await m.join()
    assert await m.heartbeat()
    await client.delete(KEYS.instance_claim("b0"))  # as if it expired while b0 froze
    assert not await m.heartbeat()
    assert not await client.exists(KEYS.instance_claim("b0"))
    assert await m.claimed(["b0", "b9"]) == set()
    assert await m.rejoin()  # a new incarnation: leases of the old one stay orphaned
    assert await m.claimed(["b0", "b9"]) == {"b0"}
    assert await m.heartbeat()


async def test_another_process_holding_the_id_stops_the_heartbeat(
    client: aioredis.Redis,
) -> None:
    m = Membership(client, keys=KEYS, instance_id="b0", ttl_s=5.0)
    await m.join()
    await client.set(KEYS.instance_claim("b0"), "someone-else", px=5000)
    assert not await m.heartbeat()
    assert not await m.rejoin()  # still held by the other process


async def test_the_inbox_delivers_what_was_posted_while_its_reader_was_away(
    client: aioredis.Redis,
) -> None:
    inbox = Inbox(client, keys=KEYS, instance_id="b0")
    sender = Inbox(client, keys=KEYS, instance_id="b1")
    await sender.post("b0", "restart", "old")  # to a past life of b0: void
    await inbox.open()
    await sender.post("b0", "kick", "s1")  # before the reader runs
    got: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def handle(op: str, session_id: str) -> None:
        got.append((op, session_id))
        if len(got) == 2:
            done.set()

    assert 0 < await client.ttl(KEYS.instance_inbox("b0")) <= 86_400
    reader = asyncio.create_task(inbox.run(handle))
    try:
        await sender.post("b0", "stop", "s2")
        await asyncio.wait_for(done.wait(), 10)
    finally:
        reader.cancel()
        await asyncio.wait([reader], timeout=5)
    assert got == [("kick", "s1"), ("stop", "s2")]
