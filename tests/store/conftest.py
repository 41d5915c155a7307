"""Store fixtures: one behavioural contract, run against every backend.

`backend` is parametrized over memory and Redis; `backend.open()` returns a
new view of the same data (for Redis a second RedisStore on the same server,
as a second broker instance would have; for memory the same object).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore
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

    def __init__(self, name: str, server: RedisServer | None) -> None:
        self.name = name
        self.server = server
        self._memory: MemoryStore | None = None
        self._opened: list[Store] = []

    async def open(self, *, event_log_size: int = 10_000) -> Store:
        if self.server is None:
            if self._memory is None:
                self._memory = MemoryStore(event_log_size=event_log_size)
            return self._memory
        store = open_redis(self.server, event_log_size=event_log_size)
        self._opened.append(store)
        return store

    async def close(self) -> None:
        for store in self._opened:
            await store.close()
        if self._memory is not None:
            await self._memory.close()


def open_redis(
    server: RedisServer, *, event_log_size: int = 10_000, consumer: str | None = None
) -> RedisStore:
    return RedisStore.from_url(server.url, credential_key=TEST_KEY, recheck_s=RECHECK_S,
                               event_log_size=event_log_size, consumer=consumer)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("shared_redis")
    backend = Backend(request.param, server)
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def store(backend: Backend) -> Store:
    return await backend.open()
