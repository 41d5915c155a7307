"""Fixtures for scale-out tests: a real redis-server and broker processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from broker.store.crypto import generate_key
from broker.store.redis import connect
from tests.cluster.procs import BrokerProcess, ProcessFactory
from tests.redis_cluster import (  # noqa: F401  (fixtures)
    redis_cluster,
    shared_redis_cluster,
    shared_redis_cluster_servers,
)
from tests.redis_sentinel import sentinel_group  # noqa: F401  (fixture)
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis


@pytest.fixture
def credential_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    value = "k1:" + generate_key()
    monkeypatch.setenv("BROKER_CREDENTIAL_KEYS", value)
    return {"BROKER_CREDENTIAL_KEYS": value}


@pytest.fixture
def broker_processes(tmp_path: Path, credential_env: dict[str, str]) -> Iterator[ProcessFactory]:
    procs: list[BrokerProcess] = []

    def factory(name: str, store_url: str, upstream_url: str, *extra: str,
                module: str = "broker.cli", env: dict[str, str] | None = None) -> BrokerProcess:
        proc = BrokerProcess(name, store_url, upstream_url, tmp_path,
                             credential_env | (env or {}), extra, module)
        proc.start()
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.close()


@dataclass(frozen=True)
class RedisTarget:
    """What the brokers are pointed at: one redis-server or a 3-primary cluster."""

    url: str

    def client(self) -> aioredis.Redis:
        """A client for the test's own reads (a RedisCluster on the cluster)."""
        if self.url.startswith(connect.CLUSTER_SCHEME):
            return connect.cluster(self.url)  # type: ignore[return-value]
        return aioredis.Redis.from_url(self.url)


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_target(request: pytest.FixtureRequest) -> RedisTarget:
    """The scale-out suite runs on both: a private server, or the shared cluster (flushed)."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return RedisTarget(server.url)
    return RedisTarget(request.getfixturevalue("shared_redis_cluster").url)
