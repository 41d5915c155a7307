"""What a Redis failover answers a broker mid-command becomes STORE_UNAVAILABLE or a
retry, never INTERNAL.

A primary without the outbox script (after a failover) under --durability replica:

redis-py loads a pipeline's scripts once, before its retry loop: when the
connection drops mid-write and the retry reconnects to a newly promoted
primary, EVALSHA meets a server that never loaded the script and answers
NOSCRIPT. A real redis-server stands in for the new primary; the script cache
is flushed right after the pipeline loaded it, which is what that primary
looks like to the retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from broker.errors import StoreUnavailable
from broker.store.base import SessionRecord
from broker.store.redis import RedisStore
from broker.store.redis.durability import Replica
from tests.helpers import eventually_async
from tests.redis_server import RedisServer
from tests.store.conftest import open_redis


def _replica_store(server: RedisServer) -> RedisStore:
    store = open_redis(server, durability="replica")
    assert isinstance(store.durability, Replica)
    store.durability.replicas = 0  # a standalone server: no replica to wait for
    return store


@pytest.fixture
async def local_store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    store = open_redis(redis_server)
    await store.create_session(SessionRecord("s1", "t1"))
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the same server, for what an operator or a failover does."""
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def scripts_lost_after_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Flush the server's scripts right after a pipeline loaded them, for the first
    `times[0]` pipelines that load any; yields [times, loads so far]."""
    state = [1, 0]
    load: Any = Pipeline.load_scripts  # redis-py leaves it untyped

    async def load_then_lose(self: Any) -> None:
        await load(self)
        state[1] += 1
        if state[1] <= state[0]:
            await self.immediate_execute_command("SCRIPT", "FLUSH")

    monkeypatch.setattr(Pipeline, "load_scripts", load_then_lose)
    yield state


async def test_a_write_whose_script_vanished_runs_once_where_the_pipeline_now_runs(
    redis_server: RedisServer, scripts_lost_after_loading: list[int]
) -> None:
    store = _replica_store(redis_server)
    try:
        await store.create_session(SessionRecord("s1", "t1"))
        accepted = await store.enqueue("s1", "+1", "hello", "k1", max_depth=10, at=1.0)
        assert scripts_lost_after_loading[1] == 2  # lost once, loaded again, ran
        pending = await store.pending("s1", 10)
        assert [m.message_id for m in pending] == [accepted.message.message_id]  # once
    finally:
        await store.close()


async def test_a_script_missing_on_every_try_is_store_unavailable_not_internal(
    redis_server: RedisServer, scripts_lost_after_loading: list[int]
) -> None:
    scripts_lost_after_loading[0] = 1_000
    store = _replica_store(redis_server)
    try:
        await store.create_session(SessionRecord("s1", "t1"))
        with pytest.raises(StoreUnavailable):
            await store.enqueue("s1", "+1", "hello", "k1", max_depth=10, at=1.0)
        scripts_lost_after_loading[0] = 0
        assert await store.pending("s1", 10) == []  # nothing half written
    finally:
        await store.close()


async def test_a_blocking_read_unblocked_by_the_server_is_store_unavailable(
    local_store: RedisStore, admin: aioredis.Redis,
) -> None:
    """A primary demoted to replica answers its blocked clients UNBLOCKED; so does
    CLIENT UNBLOCK ... ERROR, which a real server sends here."""
    read = asyncio.create_task(local_store.read_inbound("s1", "g", "c", 10, block_s=30.0))

    async def blocked_reader() -> int | None:
        for client in await admin.client_list():
            if client.get("cmd") == "xreadgroup" and "b" in client.get("flags", ""):
                return int(client["id"])
        return None

    async def blocked() -> bool:
        return await blocked_reader() is not None

    await eventually_async(blocked, 10.0, "the read to block")
    reader_id = await blocked_reader()
    assert reader_id is not None
    await admin.client_unblock(reader_id, error=True)
    with pytest.raises(StoreUnavailable):
        await read


async def test_too_few_replicas_for_min_replicas_to_write_is_store_unavailable(
    local_store: RedisStore, admin: aioredis.Redis,
) -> None:
    """A primary set to refuse writes without replicas answers NOREPLICAS (a replica
    lost in a failover); a real server answers it here."""
    await admin.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(StoreUnavailable):
            await local_store.enqueue("s1", "+1", "hello", "k1", max_depth=10, at=1.0)
    finally:
        await admin.config_set("min-replicas-to-write", 0)
    assert await local_store.pending("s1", 10) == []  # refused, not half written
