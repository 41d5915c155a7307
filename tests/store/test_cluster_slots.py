"""The cluster client's own slot lookup (`MigratingCluster._determine_slot`) sends
every command where redis-py's general lookup would: checked against it for each
command the fast path covers (made red once with a slot off by one)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from broker.store.redis import connect
from tests.redis_cluster import (  # noqa: F401  (fixtures)
    RedisClusterServers,
    shared_redis_cluster,
    shared_redis_cluster_servers,
)

pytestmark = pytest.mark.redis

KEYS = ["P:{s:a}:outbox", "P:{s:zz-9}:last", b"P:{e:3}:events", "plain-key"]
ARGS: dict[str, tuple[Any, ...]] = {
    "GET": (), "SET": ("v",), "INCR": (), "PEXPIRE": (100,), "HGET": ("f",),
    "HGETALL": (), "HSET": ("f", "v"), "HMGET": ("f", "g"), "HDEL": ("f",),
    "SMEMBERS": (), "SADD": ("m",), "SREM": ("m",), "XADD": ("*", "f", "v"),
    "XRANGE": ("-", "+"), "XREVRANGE": ("+", "-"), "XLEN": (), "XACK": ("g", "1-0"),
    "XAUTOCLAIM": ("g", "c", 0, "0-0"), "XPENDING": ("g",), "XCLAIM": ("g", "c", 0, "1-0"),
}


@pytest.fixture
async def client(
    shared_redis_cluster: RedisClusterServers,  # noqa: F811
) -> AsyncIterator[connect.MigratingCluster]:
    opened = connect.cluster(shared_redis_cluster.url)
    assert isinstance(opened, connect.MigratingCluster)
    await opened.initialize()
    yield opened
    await opened.aclose()


def test_every_fast_path_command_is_checked() -> None:
    assert set(ARGS) == connect.FIRST_KEY_COMMANDS


@pytest.mark.parametrize("command", sorted(connect.FIRST_KEY_COMMANDS))
async def test_the_fast_path_picks_redis_py_s_slot(
    client: connect.MigratingCluster, command: str,
) -> None:
    for key in KEYS:
        args = (key, *ARGS[command])
        general = await RedisCluster._determine_slot(client, command, *args)
        assert await client._determine_slot(command, *args) == general, (command, key)
