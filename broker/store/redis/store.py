"""`RedisStore`: the `Store` whose state survives broker restarts and is shared by instances.

Behaves like `MemoryStore` (the reference); what differs is where things live
(the key layout: broker.store.redis.keys). The store is assembled from one
part per concern, all on the same client and keys: sessions and credentials,
the outbox, events and live state, inbound. Ownership of a session is a lease
(docs/reliability.md); every owner write is a script that first checks the
writer's fencing token against the session's ``fence`` key, so a former
owner's late writes are refused (NotOwner).
"""

from __future__ import annotations

import contextlib
import uuid

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.store.base import OneAtATime
from broker.store.crypto import CredentialCipher, resolve_cipher
from broker.store.redis import connect
from broker.store.redis.durability import durability_for
from broker.store.redis.events import EventsPart
from broker.store.redis.inbound import InboundPart
from broker.store.redis.keys import RedisKeys
from broker.store.redis.kv import KVPart
from broker.store.redis.outbox import OutboxPart
from broker.store.redis.sessions import SessionsPart


class RedisStore(SessionsPart, KVPart, OutboxPart, EventsPart, InboundPart, OneAtATime):
    """The `Store` on Redis (5+ client, Redis server 7+ for the event gap check)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        cipher: CredentialCipher | None = None,
        credential_key: bytes | None = None,
        ephemeral_key: bool = False,
        key_prefix: str = "broker",
        event_log_size: int = 10_000,
        idempotency_ttl_s: float = 86400,
        state_ttl_s: float | None = None,
        recheck_s: float = 5.0,
        inbound_redeliver_after_s: float = 30.0,
        inbound_retention_s: float | None = None,
        consumer: str | None = None,
        shards: int = 1,
        where: str = "",
        pubsub: connect.PubSubFactory | None = None,
        cluster: bool = False,
        durability: str = "local",
    ) -> None:
        """`consumer`: this instance's name in the outbox's ``owners`` consumer group.

        `shards`: how many slots the structures shared by all sessions (the event
        log, the session index) are spread over; > 1 on Redis Cluster, where the
        client is a `redis.asyncio.cluster.RedisCluster`. `where`: names the
        server(s) in errors. `pubsub`: opens the ack listener's pub/sub connection
        (default: the client's own). `cluster`: the client is a RedisCluster (whose
        pipelines refuse scripts: the coordinator's renewals must know).
        `durability`: "local" or "replica" (broker.store.redis.durability).

        `inbound_retention_s`: inbound messages older than this are trimmed (with
        their de-dup entries) as new ones arrive, acked or not; None keeps them.

        `state_ttl_s`: expiry of a session's last-event record (refreshed on every
        event); None keeps it for as long as the session exists."""
        self._cipher = resolve_cipher(cipher, credential_key, ephemeral_key)
        super().__init__(client, RedisKeys(key_prefix), where)
        self._prefix = key_prefix
        self.cluster = cluster
        self.consumer = consumer or f"c-{uuid.uuid4().hex[:12]}"
        self._init_sessions(client, shards=shards)
        self._init_kv(client)
        if cluster and durability != "local":
            raise ValueError("--durability replica needs redis:// or redis+sentinel://: a Redis "
                             "Cluster pipeline cannot carry the script and its WAIT together")
        self.durability = durability_for(durability, client)
        self._init_outbox(client, idempotency_ttl_s=idempotency_ttl_s, recheck_s=recheck_s,
                          pubsub=pubsub or connect.pubsub_of(client),
                          durability=self.durability)
        self._init_events(client, event_log_size=event_log_size, state_ttl_s=state_ttl_s,
                          shards=shards)
        self._init_inbound(client, redeliver_after_s=inbound_redeliver_after_s,
                           retention_s=inbound_retention_s)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        credential_key: bytes | None = None,
        cipher: CredentialCipher | None = None,
        ephemeral_key: bool = False,
        key_prefix: str = "broker",
        event_log_size: int = 10_000,
        idempotency_ttl_s: float = 86400,
        state_ttl_s: float | None = None,
        connect_timeout_s: float = 2.0,
        socket_timeout_s: float = 10.0,
        retries: int = 2,
        recheck_s: float = 5.0,
        inbound_redeliver_after_s: float = 30.0,
        inbound_retention_s: float | None = None,
        consumer: str | None = None,
        durability: str = "local",
    ) -> RedisStore:
        """Connect lazily to `url` (redis://, rediss://, unix://, redis+cluster://,
        redis+sentinel://; see broker.store.redis.connect). The cipher is resolved first, so a
        missing key fails before any connection is made."""
        resolved = resolve_cipher(cipher, credential_key, ephemeral_key)
        timeouts = connect.Timeouts(connect_timeout_s, socket_timeout_s, retries)
        shards, where, pubsub, cluster = 1, "", None, False
        client: aioredis.Redis
        if url.startswith(connect.CLUSTER_SCHEME):
            nodes = connect.cluster(url, timeouts)
            client = nodes  # type: ignore[assignment]  # the same commands, routed by slot
            shards, where, pubsub = connect.CLUSTER_SHARDS, url, connect.cluster_pubsub_of(nodes)
            cluster = True
        elif url.startswith(connect.SENTINEL_SCHEME):
            client, where = connect.sentinel(url, timeouts), url
        else:
            client = connect.single(url, timeouts)
        return cls(
            client, cipher=resolved, shards=shards, where=where, pubsub=pubsub, cluster=cluster,
            durability=durability,
            key_prefix=key_prefix,
            event_log_size=event_log_size,
            idempotency_ttl_s=idempotency_ttl_s, state_ttl_s=state_ttl_s, recheck_s=recheck_s,
            inbound_redeliver_after_s=inbound_redeliver_after_s,
            inbound_retention_s=inbound_retention_s, consumer=consumer,
        )

    def __repr__(self) -> str:
        return f"RedisStore({self._where}, prefix={self._prefix!r}, cipher={self._cipher!r})"

    @property
    def cipher(self) -> CredentialCipher:
        return self._cipher

    async def close(self) -> None:
        await self._acks.close()
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._client.aclose()
