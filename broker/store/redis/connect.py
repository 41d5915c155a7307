"""Redis clients for each store URL scheme: one server, or a Redis Cluster.

- ``redis://host:port/db`` (also ``rediss://``, ``unix://``): one server.
- ``redis+cluster://host:port[,host:port...]``: a Redis Cluster, reached through
  any of the listed nodes; `redis.asyncio.cluster.RedisCluster` follows MOVED
  and ASK redirections and retries TRYAGAIN during a slot migration, and
  `MigratingCluster` retries on when those run out while a slot moves.
- ``redis+sentinel://host:port[,host:port...]/service_name[/db]``: the primary
  that the listed Sentinels name for `service_name`; after a failover the
  client's next connection goes to the new primary (a connection to a demoted
  one fails READONLY and is dropped), and the store's callers retry.

Few, short retries: when Redis is down a caller should hear UNAVAILABLE within
about a second and retry with its idempotency key, rather than hang in the
client's own long default backoff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential

CLUSTER_SCHEME = "redis+cluster://"
SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SHARDS = 16
"""Slots the shared structures (event log, session index) are spread over on a cluster."""


MAX_CONNECTIONS = 2**31
"""Connections per server (per node on a cluster): as many as the callers need.

redis-py (8.x) allows 100 by default, on one server and per cluster node, and
then raises MaxConnectionsError instead of waiting: 100 blocking reads side by
side (Receive streams, Send waits) or a burst of session starts would fail
requests. The server's own `maxclients` is the bound that matters."""


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 2.0
    socket_s: float = 10.0
    retries: int = 2

    def retry(self) -> Retry:
        return Retry(ExponentialBackoff(cap=0.5, base=0.05), self.retries)


C = TypeVar("C", bound=AbstractConnection)


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def hiredis_packing(base: type[C]) -> type[C]:
    """`base`, packing its commands with hiredis as redis-py's sync client already
    does; its asyncio client still packs them in Python (redis/redis-py#4176).

    The store's scripts carry a few hundred arguments per call (an outbox batch's
    keys, ids, bodies): about 250 us to pack in Python here, 20 us in hiredis, on
    the event loop every Send waits on. The bytes on the wire are the same; an
    argument Redis cannot take is a DataError either way. Without hiredis, `base`."""
    if not HIREDIS_AVAILABLE or issubclass(base, tuple(_PACKED.values())):
        return base
    if base not in _PACKED:
        _PACKED[base] = type(f"Hiredis{base.__name__}", (base,),
                             {"pack_command": _hiredis_pack_command})
    return cast(type[C], _PACKED[base])


_SERIALIZER = HiredisRespSerializer()  # type: ignore[no-untyped-call, unused-ignore]


def _hiredis_pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
    packed: list[bytes] = _SERIALIZER.pack(*args)
    return packed


def _pack_with_hiredis(pool: ConnectionPool) -> None:
    """Set before the pool made any connection: every one it makes packs with hiredis."""
    pool.connection_class = hiredis_packing(pool.connection_class)


def single(url: str, timeouts: Timeouts = Timeouts()) -> aioredis.Redis:
    client = aioredis.Redis.from_url(
        url, socket_connect_timeout=timeouts.connect_s, socket_timeout=timeouts.socket_s,
        retry=timeouts.retry(), max_connections=MAX_CONNECTIONS)
    _pack_with_hiredis(client.connection_pool)
    return client


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    """The (host, port) startup nodes of a ``redis+cluster://`` URL."""
    if not url.startswith(CLUSTER_SCHEME):
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    return _hosts(url, urlsplit("redis://" + url[len(CLUSTER_SCHEME):]).netloc)


def sentinel_target(url: str) -> tuple[list[tuple[str, int]], str, int]:
    """The Sentinels, service name and db of a ``redis+sentinel://`` URL."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"not a Redis Sentinel URL: {url!r}")
    parts = urlsplit("redis://" + url[len(SENTINEL_SCHEME):])
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{url!r}: expected redis+sentinel://host:port[,host:port]/"
                         "service_name[/db]")
    return _hosts(url, parts.netloc), path[0], int(path[1]) if len(path) == 2 else 0


def _hosts(url: str, netloc: str) -> list[tuple[str, int]]:
    nodes: list[tuple[str, int]] = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: each node must be host:port (got {part!r})")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def sentinel(url: str, timeouts: Timeouts = Timeouts()) -> aioredis.Redis:
    nodes, service, db = sentinel_target(url)
    sentinels = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        nodes, socket_timeout=timeouts.connect_s, socket_connect_timeout=timeouts.connect_s)
    primary: aioredis.Redis = sentinels.master_for(
        service, db=db, socket_timeout=timeouts.socket_s,
        socket_connect_timeout=timeouts.connect_s, retry=timeouts.retry(),
        max_connections=MAX_CONNECTIONS)
    _pack_with_hiredis(primary.connection_pool)
    return primary


MIGRATION_RETRY_S = 5.0
"""How long a command refused while its slot moves is retried before it fails."""


def refused_by_migration(exc: BaseException) -> bool:
    """The cluster client's redirections ran out ("TTL exhausted": MOVED, ASK and
    TRYAGAIN replies only), or TRYAGAIN itself: the command never ran, so it is
    safe to send again, scripts included (a script runs whole or not at all)."""
    return isinstance(exc, rexc.TryAgainError) or type(exc) is rexc.ClusterError


FIRST_KEY_COMMANDS = frozenset({
    "GET", "SET", "INCR", "PEXPIRE", "HGET", "HGETALL", "HSET", "HMGET", "HDEL",
    "SMEMBERS", "SADD", "SREM", "XADD", "XRANGE", "XREVRANGE", "XLEN", "XACK",
    "XAUTOCLAIM", "XPENDING", "XCLAIM",
})
"""Commands with exactly one key, their first argument (the store's common ones)."""


class MigratingCluster(RedisCluster):
    """A RedisCluster that rides through slot migrations.

    While a slot moves, a script whose declared keys are split between the two
    nodes is refused with TRYAGAIN until the last key moved, for longer than the
    client's own 16 quick attempts; and redis-py's asyncio client sends ASKING on
    one pooled connection and the redirected command on another, so under load an
    ASK can bounce between the nodes (MOVED back) until its attempts run out.
    Each such refusal is retried here, with backoff, for up to MIGRATION_RETRY_S.

    Built with ``reinitialize_steps=0``: a MOVED reply only moves its slot in the
    client's map. The default (a full reinitialisation every 5th MOVED) closes
    every pooled connection, including those other tasks are using at that
    moment, which then fail ("Connection closed", or an AttributeError on a
    connection torn down under them): a slot migration moves many slots at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # redis-py builds every node's connections from these kwargs (nodes found
        # later too) and takes no connection class of its own: set before any
        # connection was made (see hiredis_packing).
        shared = self.nodes_manager.connection_kwargs  # the client's own dict
        packed = hiredis_packing(shared["connection_class"])
        shared["connection_class"] = packed
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = packed

    async def _determine_slot(self, command: str, *args: Any) -> int:
        """The slot of the commands the store sends most, worked out here.

        For single-key commands whose key is the first argument, the key gives the
        slot at once: redis-py looks each command's keys up in its command table
        first, a sixth of a broker's CPU while it reads 100,000 session records.
        XREAD / XREADGROUP: redis-py asks the server (COMMAND GETKEYS, a round trip
        per call, twice) for commands with movable keys, which would double an
        idle instance's Redis commands (its tail blocks on 16 shards)."""
        name = command.upper()
        if name in FIRST_KEY_COMMANDS and args:
            return self.keyslot(args[0])
        if name in ("XREAD", "XREADGROUP"):
            words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
            upper = [w.upper() for w in words]
            if "STREAMS" in upper:
                rest = words[upper.index("STREAMS") + 1:]
                slots = {self.keyslot(key) for key in rest[:len(rest) // 2]}
                if len(slots) == 1:
                    return slots.pop()
        return await super()._determine_slot(command, *args)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:  # the common case without the retrier's per-call cost
            return await super().execute_command(*args, **kwargs)
        except Exception as exc:
            if not refused_by_migration(exc):
                raise
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(refused_by_migration),
            stop=stop_after_delay(MIGRATION_RETRY_S),
            wait=wait_exponential(multiplier=0.02, max=0.5), reraise=True,
        ):
            with attempt:
                return await super().execute_command(*args, **kwargs)
        raise AssertionError("unreachable: the retry reraises")


def cluster(url: str, timeouts: Timeouts = Timeouts()) -> RedisCluster:
    return MigratingCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        reinitialize_steps=0, max_connections=MAX_CONNECTIONS,
        socket_connect_timeout=timeouts.connect_s, socket_timeout=timeouts.socket_s,
        retry=timeouts.retry(),
    )


def open_client(url: str, timeouts: Timeouts = Timeouts()) -> aioredis.Redis:
    """A client for any Redis URL scheme above (the heartbeat thread's own)."""
    if url.startswith(CLUSTER_SCHEME):
        return cluster(url, timeouts)  # type: ignore[return-value]  # routed by slot
    if url.startswith(SENTINEL_SCHEME):
        return sentinel(url, timeouts)
    return single(url, timeouts)


PubSubFactory = Callable[[], Awaitable[PubSub]]
"""Opens a pub/sub connection (the ack listener's)."""


def pubsub_of(client: aioredis.Redis) -> PubSubFactory:
    async def open_pubsub() -> PubSub:
        return client.pubsub()

    return open_pubsub


def cluster_pubsub_of(client: RedisCluster) -> PubSubFactory:
    """Classic pub/sub on a cluster: PUBLISH reaches every node, so one connection to
    any node hears every channel; the client must know the slots before it picks one."""

    async def open_pubsub() -> PubSub:
        await client.initialize()
        return client.pubsub()

    return open_pubsub
