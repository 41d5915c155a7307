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
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from broker.store.base import OneAtATime
from broker.store.crypto import CredentialCipher, resolve_cipher
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
    ) -> None:
        """`consumer`: this instance's name in the outbox's ``owners`` consumer group.

        `inbound_retention_s`: inbound messages older than this are trimmed (with
        their de-dup entries) as new ones arrive, acked or not; None keeps them.

        `state_ttl_s`: expiry of a session's last-event record (refreshed on every
        event); None keeps it for as long as the session exists."""
        self._cipher = resolve_cipher(cipher, credential_key, ephemeral_key)
        super().__init__(client, RedisKeys(key_prefix))
        self._prefix = key_prefix
        self.consumer = consumer or f"c-{uuid.uuid4().hex[:12]}"
        self._init_sessions(client)
        self._init_kv(client)
        self._init_outbox(client, idempotency_ttl_s=idempotency_ttl_s, recheck_s=recheck_s)
        self._init_events(client, event_log_size=event_log_size, state_ttl_s=state_ttl_s)
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
    ) -> RedisStore:
        """Connect lazily to `url` (redis://, rediss://, unix://).

        Few, short retries: when Redis is down a caller should hear UNAVAILABLE
        within about a second and retry with its idempotency key, rather than
        hang in the client's own long default backoff. The cipher is resolved
        first, so a missing key fails before any connection is made.
        """
        resolved = resolve_cipher(cipher, credential_key, ephemeral_key)
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries),
        )
        return cls(
            client, cipher=resolved, key_prefix=key_prefix, event_log_size=event_log_size,
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
