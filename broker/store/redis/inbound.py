"""Inbound messages: one stream per session, read by worker groups at least once.

Each worker group is a consumer group on the session's inbound stream; a
delivery stays pending for its consumer until acked and is claimed (XAUTOCLAIM)
by another reader of the group once idle for the redelivery delay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from broker.store.base import (
    INBOUND,
    NO_ORIGIN,
    InboundDelivery,
    InboundOrigin,
    InboundRecord,
    NewEntry,
)
from broker.store.redis import scripts
from broker.store.redis.codecs import (
    as_bytes,
    autoclaim_reply,
    inbound_record,
    stream_rows,
    text,
)
from broker.store.redis.core import RedisCore, block_ms, guard
from broker.store.redis.scripts import fence_arg

_MAX_CLAIM_ROUNDS = 10
"""XAUTOCLAIM scans a bounded slice of the pending list per call; this many calls
bound one read's claiming."""


class InboundPart(RedisCore):
    def _init_inbound(
        self, client: aioredis.Redis, *, redeliver_after_s: float, retention_s: float | None
    ) -> None:
        self._redeliver_after_ms = max(1, int(redeliver_after_s * 1000))
        #: the inbound script's retention argument (0: keep everything)
        self._inbound_retention_ms = max(1, int(retention_s * 1000)) if retention_s else 0
        self._add_inbound = client.register_script(scripts.ADD_INBOUND)
        self._release_consumers = client.register_script(scripts.RELEASE_CONSUMERS)

    @guard
    async def add_inbound(
        self, session_id: str, upstream_id: str, sender: str, body: str, at: float, *,
        fence: int | None = None, origin: InboundOrigin = NO_ORIGIN, topic: str = INBOUND,
        content: bytes | None = None, media: bytes | None = None,
    ) -> InboundRecord | None:
        """One Lua script: the fence and de-dup checks, the append (with the medium's
        bytes) and the trim are atomic."""
        [record] = await self._add(
            session_id, [NewEntry(upstream_id, sender, body, origin, content, media)], at,
            topic, fence)
        return record

    @guard
    async def inbound_media(self, session_id: str, upstream_id: str) -> bytes | None:
        data: Any = await self._client.hget(self.keys.inbound_media(session_id), upstream_id)
        return None if data is None else as_bytes(data)

    @guard
    async def add_entries(
        self, session_id: str, entries: Sequence[NewEntry], at: float, *, topic: str,
        fence: int | None = None,
    ) -> list[InboundRecord | None]:
        """One script call: the fence and de-dup checks, the appends and the trim are
        atomic."""
        return await self._add(session_id, entries, at, topic, fence)

    async def _add(
        self, session_id: str, entries: Sequence[NewEntry], at: float, topic: str,
        fence: int | None,
    ) -> list[InboundRecord | None]:
        if not entries:
            return []
        k = self.keys
        args: list[Any] = [repr(at), self._inbound_retention_ms, fence_arg(fence)]
        for e in entries:
            args += [e.upstream_id, e.sender, e.body, e.origin.to_json(), e.content or b"",
                     e.media or b""]
        added: list[Any] = await self._add_inbound(
            keys=[k.inbound(session_id, topic), k.inbound_seen(session_id, topic),
                  k.inbound_aged(session_id, topic), k.fence(session_id),
                  k.inbound_media(session_id, topic)],
            args=args)
        return [InboundRecord(session_id=session_id, inbound_id=text(entry_id),
                              upstream_id=e.upstream_id, sender=e.sender, body=e.body,
                              received_at=at, origin=e.origin, content=e.content or None)
                if entry_id else None
                for e, entry_id in zip(entries, added, strict=True)]

    @guard
    async def find_inbound(
        self, session_id: str, upstream_ids: Sequence[str], *, topic: str = INBOUND
    ) -> dict[str, InboundRecord]:
        wanted = list(dict.fromkeys(upstream_ids))
        if not wanted:
            return {}
        key = self.keys.inbound(session_id, topic)
        entries = await self._client.hmget(self.keys.inbound_seen(session_id, topic), wanted)
        found: dict[str, InboundRecord] = {}
        for uid, entry in zip(wanted, entries, strict=True):
            if entry is None:
                continue
            rows: Any = await self._client.xrange(key, text(entry), text(entry), count=1)
            for entry_id, raw in rows or ():
                if raw:
                    found[uid] = inbound_record(session_id, entry_id, raw)
        return found

    @guard
    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float, *,
        topic: str = INBOUND,
    ) -> list[InboundDelivery]:
        if count <= 0:
            return []
        key = self.keys.inbound(session_id, topic)
        return await self._groups.run(key, group, lambda: self._read_group(
            session_id, key, group, consumer, count, block_s))

    async def _read_group(
        self, session_id: str, key: str, group: str, consumer: str, count: int, block_s: float
    ) -> list[InboundDelivery]:
        """Idle pending entries claimed first, then new ones (blocking only when
        nothing was claimed)."""
        out = await self._claim(session_id, key, group, consumer, count)
        if len(out) >= count:
            return out
        reply = await self._client.xreadgroup(
            group, consumer, {key: ">"}, count=count - len(out),
            block=None if out or block_s <= 0 else block_ms(block_s),
        )
        out.extend(InboundDelivery(inbound_record(session_id, entry_id, raw), 1)
                   for entry_id, raw in stream_rows(reply) if raw)
        return out

    async def _claim(
        self, session_id: str, key: str, group: str, consumer: str, count: int
    ) -> list[InboundDelivery]:
        """XAUTOCLAIM entries idle past the redelivery delay, then read their counters."""
        claimed: list[InboundRecord] = []
        cursor = "0-0"
        for _ in range(_MAX_CLAIM_ROUNDS):
            cursor, rows = autoclaim_reply(await self._client.xautoclaim(
                key, group, consumer, self._redeliver_after_ms, cursor,
                count=count - len(claimed),
            ))
            claimed.extend(inbound_record(session_id, entry_id, raw)
                           for entry_id, raw in rows if raw)
            if cursor == "0-0" or len(claimed) >= count:
                break
        if not claimed:
            return []
        # Entries moved away from idle consumers: those left empty can go.
        await self._release_consumers(keys=[key], args=[group, "", self._redeliver_after_ms])
        async with self._client.pipeline(transaction=False) as pipe:
            for record in claimed:
                pipe.xpending_range(key, group, record.inbound_id, record.inbound_id, 1)
            pending: list[Any] = await pipe.execute()
        counts = [int(row[0]["times_delivered"]) if row else 2 for row in pending]
        return [InboundDelivery(r, c) for r, c in zip(claimed, counts, strict=True)]

    @guard
    async def ack_inbound(
        self, session_id: str, group: str, inbound_ids: list[str], *, topic: str = INBOUND
    ) -> int:
        if not inbound_ids:
            return 0
        return int(await self._client.xack(self.keys.inbound(session_id, topic), group,
                                           *dict.fromkeys(inbound_ids)))

    @guard
    async def release_inbound_consumer(
        self, session_id: str, group: str, consumer: str, *, topic: str = INBOUND
    ) -> None:
        """Delete the consumer (its Receive call ended) unless it holds deliveries, and
        any other consumer of the group idle past the redelivery delay with none."""
        await self._release_consumers(keys=[self.keys.inbound(session_id, topic)],
                                      args=[group, consumer, self._redeliver_after_ms])
