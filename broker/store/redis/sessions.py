"""Sessions, their fencing tokens and their (encrypted) credentials."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.store.base import SessionRecord
from broker.store.crypto import CredentialCipher
from broker.store.redis import scripts
from broker.store.redis.codecs import (
    as_bytes,
    fields,
    flag,
    session_from_flat,
    session_record,
    text,
)
from broker.store.redis.core import RedisCore, guard
from broker.store.redis.keys import shard_of
from broker.store.redis.scripts import fence_arg

LIST_CHUNK = 2000
"""Session records read per pipeline when listing them all: the event loop gets a
turn between chunks, so 100,000 records never pack and parse in one go (seconds
on which nothing else of the process, its heartbeat's progress included, runs)."""


class SessionsPart(RedisCore):
    _cipher: CredentialCipher

    def _init_sessions(self, client: aioredis.Redis, *, shards: int = 1) -> None:
        """`shards` > 1: the index of all sessions is that many sets, one slot each
        (Redis Cluster), else the one set ``P:sessions``."""
        self._index_shards = shards
        self._create = client.register_script(scripts.CREATE_SESSION)
        self._set_enabled = client.register_script(scripts.SET_ENABLED)
        self._new_fence = client.register_script(scripts.NEW_FENCE)
        self._set_credentials = client.register_script(scripts.SET_CREDENTIALS)

    def _index(self, session_id: str) -> str:
        if self._index_shards > 1:
            return self.keys.sessions_shard(shard_of(session_id, self._index_shards))
        return self.keys.sessions

    def _indexes(self) -> list[str]:
        if self._index_shards > 1:
            return [self.keys.sessions_shard(i) for i in range(self._index_shards)]
        return [self.keys.sessions]

    # sessions
    @guard
    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        sid = record.session_id
        existing = await self._create(
            keys=[self.keys.session(sid)],
            args=[record.tenant, flag(record.enabled), repr(record.created_at)],
        )
        stored = session_from_flat(sid, list(existing)) if existing else record
        # Index after the record exists; repeated on every create so a retry repairs a
        # crash between the two (the index keys live in other cluster slots).
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.sadd(self._index(sid), sid)
            pipe.sadd(self.keys.tenant(stored.tenant), sid)
            pipe.incr(self.keys.sessions_version)
            await pipe.execute()
        return stored, not existing

    @guard
    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await self._client.hgetall(self.keys.session(session_id))
        return session_record(session_id, raw) if raw else None

    @guard
    async def list_sessions(self, tenant: str | None = None) -> list[SessionRecord]:
        indexes = self._indexes() if tenant is None else [self.keys.tenant(tenant)]
        async with self._client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.smembers(index)
            members = await pipe.execute()
        ids = sorted({text(m) for shard in members for m in shard})
        if not ids:
            return []
        records: list[SessionRecord] = []
        for start in range(0, len(ids), LIST_CHUNK):
            chunk = ids[start:start + LIST_CHUNK]
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in chunk:
                    pipe.hgetall(self.keys.session(sid))
                rows = await pipe.execute()
            records += [
                record for sid, raw in zip(chunk, rows, strict=True) if raw
                for record in [session_record(sid, raw)]
                if tenant is None or record.tenant == tenant
            ]
        return records

    @guard
    async def set_enabled(self, session_id: str, enabled: bool) -> None:
        await self._set_enabled(keys=[self.keys.session(session_id)], args=[flag(enabled)])
        await self._client.incr(self.keys.sessions_version)  # after: a reload sees it

    @guard
    async def delete_session(self, session_id: str) -> None:
        """Remove the session and every key under its hash tag but its fencing token,
        which is raised first: a former owner's late writes are refused, and a
        re-created session's owner starts above every earlier token."""
        raw = await self._client.hgetall(self.keys.session(session_id))
        fence = self.keys.fence(session_id)
        await self._new_fence(keys=[fence])
        batch: list[bytes | str] = []
        async for key in self._client.scan_iter(match=self.keys.session_pattern(session_id),
                                                count=500):
            if text(key) == fence:
                continue
            batch.append(key)
            if len(batch) >= 500:
                await self._client.unlink(*batch)
                batch.clear()
        if batch:
            await self._client.unlink(*batch)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.srem(self._index(session_id), session_id)
            if raw:
                pipe.srem(self.keys.tenant(fields(raw).get("tenant", "")), session_id)
            pipe.incr(self.keys.sessions_version)
            await pipe.execute()
        self._forget_session(session_id)

    # fencing
    @guard
    async def new_fence(self, session_id: str) -> int:
        return int(text(await self._new_fence(keys=[self.keys.fence(session_id)])))

    # credentials: sealed with the session id as associated data (broker.store.crypto)
    @guard
    async def save_credentials(
        self, session_id: str, credentials: dict[str, Any], *, fence: int | None = None
    ) -> None:
        sealed = self._cipher.encrypt(session_id, credentials)
        await self._set_credentials(
            keys=[self.keys.creds(session_id), self.keys.fence(session_id)],
            args=[fence_arg(fence), sealed])

    @guard
    async def load_credentials(self, session_id: str) -> dict[str, Any] | None:
        sealed = await self._client.get(self.keys.creds(session_id))
        return None if sealed is None else self._cipher.decrypt(session_id, as_bytes(sealed))

    @guard
    async def has_credentials(self, session_id: str) -> bool:
        return bool(await self._client.exists(self.keys.creds(session_id)))

    @guard
    async def clear_credentials(self, session_id: str, *, fence: int | None = None) -> None:
        await self._set_credentials(
            keys=[self.keys.creds(session_id), self.keys.fence(session_id)],
            args=[fence_arg(fence)])
