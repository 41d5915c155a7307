"""Store fixtures: one behavioural contract, run against every backend.

`backend` is parametrized over memory, SQLite and Redis; `backend.open()` returns
a new view of the same data (for Redis a second RedisStore on the same server,
as a second broker instance would have; for memory and SQLite, which serve one
process, the same object). `backend.fresh(...)` opens a separate store with its
own options (on Redis: the same server under another key prefix).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.store.base import DeliveryResult, OutboxBatch, Store
from broker.store.crypto import CredentialCipher
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore
from broker.store.sqlite import SqliteStore
from tests.redis_cluster import (  # noqa: F401  (fixtures)
    RedisClusterServers,
    shared_redis_cluster,
    shared_redis_cluster_servers,
)
from tests.redis_server import (  # noqa: F401  (fixtures)
    RedisServer,
    redis_server,
    shared_redis,
    shared_redis_server,
)

TEST_KEY = base64.b64decode("q0cHhN1fXo4yJm2Sx8wqYQ4wmS9nUo6kq2Vd0yQ1s3c=")

RECHECK_S = 120.0
"""Far beyond every test's wait, so a wake-up that works only thanks to the
safety-net re-check fails the test instead of passing slowly."""


class Backend:
    """Opens views of one backend and closes them all at the end."""

    def __init__(self, name: str, server: RedisServer | RedisClusterServers | None,
                 tmp: Path) -> None:
        self.name = name
        self.server = server
        self.tmp = tmp
        self._single: Store | None = None
        """The memory or SQLite store that every `open()` returns."""
        self._opened: list[Store] = []
        self._fresh = itertools.count(1)

    async def open(self, *, event_log_size: int = 10_000) -> Store:
        if self.server is None:
            if self._single is None:
                self._single = self._new(event_log_size=event_log_size)
            return self._single
        store = open_redis(self.server, event_log_size=event_log_size)
        self._opened.append(store)
        return store

    async def fresh(self, **options: Any) -> Store:
        """A store of its own (MemoryStore / SqliteStore / RedisStore keyword options)."""
        if self.server is None:
            store = self._new(**options)
        else:
            store = RedisStore.from_url(self.server.url, credential_key=TEST_KEY,
                                        key_prefix=f"fresh{next(self._fresh)}",
                                        **options)
        self._opened.append(store)
        return store

    def _new(self, **options: Any) -> Store:
        if self.name == "memory":
            return MemoryStore(**options)
        path = self.tmp / f"store{next(self._fresh)}.db"
        return open_sqlite(path, **options)

    async def close(self) -> None:
        for store in self._opened:
            await store.close()
        if self._single is not None:
            await self._single.close()


def open_sqlite(path: Path, **options: Any) -> SqliteStore:
    return SqliteStore(path, cipher=CredentialCipher.from_key(TEST_KEY),
                       **options)


def open_redis(
    server: RedisServer | RedisClusterServers, *, event_log_size: int = 10_000,
    consumer: str | None = None, durability: str = "local",
) -> RedisStore:
    return RedisStore.from_url(server.url, credential_key=TEST_KEY, recheck_s=RECHECK_S,
                               event_log_size=event_log_size, consumer=consumer,
                               durability=durability)


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("redis-cluster", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    server: RedisServer | RedisClusterServers | None = None
    if request.param == "redis":
        server = request.getfixturevalue("shared_redis")
    elif request.param == "redis-cluster":
        server = request.getfixturevalue("shared_redis_cluster")
    backend = Backend(request.param, server, tmp_path)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()


async def mark_acked(store: Store, session_id: str, message_id: str, at: float, *,
                     fence: int | None = None) -> DeliveryResult:
    """Record one upstream ack, as the delivery loop's batch does."""
    result = await store.apply_outbox(session_id, OutboxBatch(acks=[message_id]), max_depth=0,
                                      at=at, fence=fence)
    return result.acked[0]
