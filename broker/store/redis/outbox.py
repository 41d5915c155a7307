"""The durable outbox: a stream per session, read by its owner through a consumer group.

The owner reads under its instance's consumer name in the ``owners`` group;
an ack is an XACK plus XDEL. Every read for delivery first takes over what
other consumers (former owners) read and never acked, and every owner write
is a fenced script (broker.store.redis.scripts).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from broker.errors import OutboxFull
from broker.store.base import (
    Accepted,
    DeliveryResult,
    OutboxBatch,
    OutboxBatchResult,
    OutboxMessage,
    event_order,
    new_message_id,
    outbox_full,
)
from broker.store.redis import scripts
from broker.store.redis.acks import AckListener
from broker.store.redis.codecs import (
    as_bytes,
    delivery_result,
    idem_record,
    outbox_entry,
    stream_rows,
    text,
)
from broker.store.redis.connect import PubSubFactory
from broker.store.redis.core import RedisCore, block_ms, guard
from broker.store.redis.durability import Durability
from broker.store.redis.scripts import fence_arg

OUTBOX_GROUP = "owners"
"""The consumer group the session's owner reads its outbox through."""


class OutboxPart(RedisCore):
    consumer: str
    """This instance's consumer name in the owners' group."""

    def _init_outbox(
        self, client: aioredis.Redis, *, idempotency_ttl_s: float, recheck_s: float,
        pubsub: PubSubFactory, durability: Durability,
    ) -> None:
        self._durability = durability
        self._idem_ttl_ms = max(1, int(idempotency_ttl_s * 1000))
        self._outbox_seen: dict[str, str] = {}
        """Per session, the newest entry id `wait_outbox` saw at its last wake-up."""
        self._apply_outbox = client.register_script(scripts.APPLY_OUTBOX)
        self._pending = client.register_script(scripts.PENDING)
        self._claim_outbox = client.register_script(scripts.CLAIM_OUTBOX)
        self._acks = AckListener(pubsub, self.keys.ack_listener, recheck_s)

    def _forget_session(self, session_id: str) -> None:
        super()._forget_session(session_id)
        self._outbox_seen.pop(session_id, None)

    @guard
    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """One Lua script (APPLY_OUTBOX): key checks, depth checks, sequences, XADDs,
        acks and the claiming read are atomic, and a batch costs one round trip."""
        if not batch.acks and not batch.messages:
            return OutboxBatchResult([], [])
        k = self.keys
        args: list[str | int | bytes] = [
            repr(at), max_depth, k.idem(session_id), k.result(session_id),
            self._idem_ttl_ms, k.acked(session_id), OUTBOX_GROUP, self.consumer,
            1 if batch.claim else 0, len(batch.acks), fence_arg(fence), *batch.acks,
        ]
        for m in batch.messages:
            args += [new_message_id(), m.to, m.body, m.idempotency_key, m.content or b""]
        reply: Any = await self._durability.run(
            self._apply_outbox,
            [k.outbox(session_id), k.ids(session_id), k.seq(session_id), k.fence(session_id)],
            args)
        acked_raw, accepted_raw, claimed_raw, unread = reply
        acked = [delivery_result(mid, raw)
                 for mid, raw in zip(batch.acks, acked_raw, strict=True)]
        accepted: list[Accepted | OutboxFull] = []
        for new, item in zip(batch.messages, accepted_raw, strict=True):
            kind = text(item[0])
            if kind == "full":
                accepted.append(outbox_full(session_id, text(item[1])))
                continue
            message = idem_record(session_id, new.idempotency_key, item[1])
            if kind == "dup":
                done = item[2] if len(item) > 2 else None
                result = delivery_result(message.message_id, done) if done else None
                accepted.append(Accepted(message, True, result))
            else:
                accepted.append(Accepted(message, False))
        claimed = [outbox_entry(session_id, row) for row in claimed_raw]
        return OutboxBatchResult(acked, accepted, claimed, bool(unread))

    @guard
    async def find_by_key(self, session_id: str, idempotency_key: str) -> Accepted | None:
        raw = await self._client.get(self.keys.idem(session_id, idempotency_key))
        if raw is None:
            return None
        message = idem_record(session_id, idempotency_key, raw)
        return Accepted(message, True, await self._result(session_id, message.message_id))

    @guard
    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        """Take over what previous owners read and never acked (XAUTOCLAIM, see
        scripts.TAKE_OVER); `pending` does the same on every read, so this only counts.

        The lease (and the fence) guarantee the previous consumer is gone, so
        nothing has to sit idle first.
        """
        key = self.keys.outbox(session_id)
        taken = await self._groups.run(key, OUTBOX_GROUP, lambda: self._claim_outbox(
            keys=[key, self.keys.fence(session_id)],
            args=[OUTBOX_GROUP, self.consumer, fence_arg(fence)]))
        return int(taken)

    @guard
    async def pending(
        self, session_id: str, limit: int, after_sequence: int = 0, *, fence: int | None = None
    ) -> list[OutboxMessage]:
        """One script takes over former owners' unacked entries, then reads the consumer's
        pending list, then new entries (see scripts.PENDING)."""
        if limit <= 0:
            return []
        key = self.keys.outbox(session_id)
        rows = await self._groups.run(key, OUTBOX_GROUP, lambda: self._durability.run(
            self._pending, [key, self.keys.fence(session_id)],
            [OUTBOX_GROUP, self.consumer, limit, after_sequence, fence_arg(fence)]))
        return [outbox_entry(session_id, row) for row in rows]

    async def _result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        raw = await self._client.get(self.keys.result(session_id, message_id))
        return None if raw is None else delivery_result(message_id, raw)

    @guard
    async def result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        return await self._result(session_id, message_id)

    @guard
    async def sent_message(self, session_id: str, message_id: str) -> OutboxMessage | None:
        """Unacked: from the stream; acked: from its idempotency record, which lives
        for the idempotency TTL after the ack."""
        entry = await self._client.hget(self.keys.ids(session_id), message_id)
        if entry is not None:
            rows = await self._client.xrange(self.keys.outbox(session_id), entry, entry)
            if rows and rows[0][1]:
                flat = [item for pair in rows[0][1].items() for item in pair]
                return outbox_entry(session_id, flat)
        key = await self._client.get(self.keys.result(session_id, message_id) + ":key")
        if key is None:
            return None
        raw, content = await self._client.mget(
            [self.keys.idem(session_id, text(key)),
             self.keys.result(session_id, message_id) + ":content"])
        if raw is None:
            return None
        message = idem_record(session_id, text(key), raw)
        return message if content is None else replace(message, content=as_bytes(content))

    @guard
    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None:
        """Wait for the ack, whichever broker instance receives it (pub/sub wake-up)."""
        if timeout <= 0:
            return await self._result(session_id, message_id)
        return await self._acks.wait(
            self.keys.acked(session_id), message_id, timeout,
            lambda: self._result(session_id, message_id),
        )

    @guard
    async def outbox_depth(self, session_id: str) -> int:
        return int(await self._client.xlen(self.keys.outbox(session_id)))

    @guard
    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        """XREAD BLOCK past the newest entry this instance saw at its previous wake-up.

        The first call returns at once if anything is queued: a spurious wake-up
        costs one `pending` read, a missed one would strand a message.
        """
        key = self.keys.outbox(session_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = self._outbox_seen.get(session_id, "0-0")
        while (remaining := deadline - loop.time()) > 0:
            rows = stream_rows(await self._client.xread({key: last}, count=1,
                                                        block=block_ms(remaining)))
            if rows:
                seen = text(rows[0][0])
                newest: Any = await self._client.xrevrange(key, count=1)
                if newest and event_order(text(newest[0][0])) > event_order(seen):
                    seen = text(newest[0][0])
                self._outbox_seen[session_id] = seen
                return
