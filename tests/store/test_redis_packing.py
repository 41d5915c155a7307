"""The Redis clients pack commands with hiredis (connect.hiredis_packing).

redis-py's asyncio connections pack in Python (redis/redis-py#4176); the
store's clients, on every URL scheme, use hiredis instead. What goes on the
wire must not change: the same bytes as redis-py's own packer, and the same
kind of error for an argument Redis cannot take.
"""

from __future__ import annotations

from typing import Any

import pytest
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelManagedConnection

from broker.store.redis import connect
from tests.redis_cluster import RedisClusterServers
from tests.redis_sentinel import SentinelGroup, sentinel_group  # noqa: F401  (fixture)
from tests.redis_server import RedisServer

ARGS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "k1", "k2", "plain", "ünïcode ✓", b"\x00\xffbytes", 0, -7,
     2**63 - 1, 1.5, 1e-05, 1e20, repr(1733000000.123456)),
    ("CONFIG GET", "maxmemory"),  # a command name of two words is split
    (b"CLIENT SETNAME", b"broker"),
    ("SET", "k", memoryview(b"view")),
    ("XADD", "s", "*", *(f"f{i}" for i in range(500))),  # past redis-py's buffer cutoff
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: str(a[0]))
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    python, packed = Connection(), connect.hiredis_packing(Connection)()
    assert b"".join(packed.pack_command(*args)) == b"".join(python.pack_command(*args))


@pytest.mark.parametrize("bad", [None, True, object()])
def test_an_argument_redis_cannot_take_is_a_data_error(bad: Any) -> None:
    with pytest.raises(rexc.DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(rexc.DataError):
        connect.hiredis_packing(Connection)().pack_command("SET", "k", bad)


@pytest.mark.parametrize("base", [Connection, SSLConnection, UnixDomainSocketConnection,
                                  SentinelManagedConnection])
def test_keeps_what_the_connection_is(base: type[Connection]) -> None:
    packed = connect.hiredis_packing(base)
    assert issubclass(packed, base)
    assert packed is not base
    assert connect.hiredis_packing(base) is packed  # one class per base
    assert connect.hiredis_packing(packed) is packed  # not wrapped twice


def _packs_with_hiredis(conn: object) -> bool:
    return type(conn).__name__.startswith("Hiredis") and isinstance(conn, Connection)


@pytest.mark.redis
async def test_single_server_client(shared_redis: RedisServer) -> None:
    client = connect.single(shared_redis.url)
    try:
        await client.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, "pack:k", "ü")
        assert await client.get("pack:k") == "ü".encode()
        used = [*client.connection_pool._available_connections,
                *client.connection_pool._in_use_connections]
        assert used and all(_packs_with_hiredis(c) for c in used)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_cluster_client(shared_redis_cluster: RedisClusterServers) -> None:
    client: RedisCluster = connect.cluster(shared_redis_cluster.url)
    try:
        for i in range(30):  # keys in every node's slots
            await client.set(f"pack:{i}", str(i))
        assert [await client.get(f"pack:{i}") for i in range(30)] == [
            str(i).encode() for i in range(30)]
        nodes = client.get_nodes()
        used = [c for node in nodes for c in node._connections]
        assert len(nodes) == 3 and used
        assert all(_packs_with_hiredis(c) for c in used)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_sentinel_client(sentinel_group: SentinelGroup) -> None:  # noqa: F811
    client = connect.sentinel(sentinel_group.url)
    try:
        await client.set("pack:k", "v")
        assert await client.get("pack:k") == b"v"
        used = [*client.connection_pool._available_connections,
                *client.connection_pool._in_use_connections]
        assert used and all(_packs_with_hiredis(c) for c in used)
    finally:
        await client.aclose()
