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
from redis import exceptions as rexc

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
from broker.store.redis.core import RedisCore, block_ms, guard, server_reply
from broker.store.redis.durability import Durability
from broker.store.redis.scripts import fence_arg

_KEYS_KEPT = 10_000
"""Per session, at most this many idempotency keys of unacked messages are remembered."""
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
        self._ack_keys = client.register_script(scripts.ACK_KEYS)
        self._keys_of: dict[str, dict[str, str]] = {}
        """Per session, message id -> idempotency key of messages read for delivery."""
        self._pending = client.register_script(scripts.PENDING)
        self._claim_outbox = client.register_script(scripts.CLAIM_OUTBOX)
        self._acks = AckListener(pubsub, self.keys.ack_listener, recheck_s)

    def _forget_session(self, session_id: str) -> None:
        super()._forget_session(session_id)
        self._outbox_seen.pop(session_id, None)
        self._keys_of.pop(session_id, None)

    @guard
    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """One Lua script (APPLY_OUTBOX): key checks, depth checks, sequences, XADDs,
        acks and the claiming read are atomic, and a batch costs one round trip.

        Every key the script touches is declared, so an ack names its message's
        idempotency key: known from the read that handed the message out, else
        looked up first (ACK_KEYS)."""
        if not batch.acks and not batch.messages and not batch.refusals:
            return OutboxBatchResult([], [])
        settled = [*batch.acks, *(r.message_id for r in batch.refusals)]
        known = self._keys_of.setdefault(session_id, {})
        missing = [mid for mid in settled if mid not in known]
        if missing:
            found = await self._ack_keys(
                keys=[self.keys.outbox(session_id), self.keys.ids(session_id)], args=missing)
            known.update(zip(missing, (text(key) for key in found), strict=True))
        try:
            reply = await self._run_apply(session_id, batch, known, max_depth, at, fence)
        except rexc.ResponseError as exc:
            if not server_reply(exc).startswith("ACKKEYS"):  # also inside a pipeline
                raise
            for mid in settled:  # a key this process remembered wrongly: look again
                known.pop(mid, None)
            found = await self._ack_keys(
                keys=[self.keys.outbox(session_id), self.keys.ids(session_id)], args=settled)
            known.update(zip(settled, (text(key) for key in found), strict=True))
            reply = await self._run_apply(session_id, batch, known, max_depth, at, fence)
        for mid in settled:
            known.pop(mid, None)
        acked_raw, accepted_raw, claimed_raw, unread = reply
        acked = [delivery_result(mid, raw) for mid, raw in zip(settled, acked_raw, strict=True)]
        accepted: list[Accepted | OutboxFull] = []
        for new, item in zip(batch.messages, accepted_raw, strict=True):
            kind = text(item[0])
            if kind == "full":
                accepted.append(outbox_full(session_id, text(item[1])))
                continue
            message = idem_record(session_id, new.idempotency_key, item[1])
            if kind == "dup":  # a retry: its result, if acked meanwhile, is read apart
                accepted.append(Accepted(message, True,
                                         await self._result(session_id, message.message_id)))
            else:
                accepted.append(Accepted(message, False))
        claimed = [outbox_entry(session_id, row) for row in claimed_raw]
        self._remember_keys(session_id, claimed)
        return OutboxBatchResult(acked, accepted, claimed, bool(unread))

    async def _run_apply(
        self, session_id: str, batch: OutboxBatch, known: dict[str, str], max_depth: int,
        at: float, fence: int | None,
    ) -> Any:
        k = self.keys
        keys = [k.outbox(session_id), k.ids(session_id), k.seq(session_id), k.fence(session_id)]
        args: list[str | int | bytes] = [
            repr(at), max_depth, "", "", self._idem_ttl_ms, k.acked(session_id), OUTBOX_GROUP,
            self.consumer, 1 if batch.claim else 0,
            len(batch.acks) + len(batch.refusals), fence_arg(fence),
        ]
        # A refusal goes as an ack whose id carries "\n<code> <reason>" (the script
        # stores that as the result).
        wire = [(mid, mid) for mid in batch.acks]
        wire += [(r.message_id, f"{r.message_id}\n{r.code} {r.reason or 'refused'}")
                 for r in batch.refusals]
        for mid, sent_as in wire:
            key = known.get(mid, "")
            keys += [k.result(session_id, mid), k.result_key(session_id, mid),
                     k.idem(session_id, key) if key else k.sent(session_id, mid),
                     k.result_content(session_id, mid)]
            args += [sent_as, key]
        for m in batch.messages:
            key = m.idempotency_key if m.retryable else ""
            if key:
                keys.append(k.idem(session_id, key))
            args += [new_message_id(), m.to, m.body, key, m.content or b""]
        return await self._durability.run(self._apply_outbox, keys, args)

    def _remember_keys(self, session_id: str, messages: list[OutboxMessage]) -> None:
        """The idempotency keys of messages handed out for delivery, for their acks;
        bounded (a forgotten one is looked up)."""
        known = self._keys_of.setdefault(session_id, {})
        for m in messages:
            known[m.message_id] = m.idempotency_key
        while len(known) > _KEYS_KEPT:
            del known[next(iter(known))]

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
        messages = [outbox_entry(session_id, row) for row in rows]
        self._remember_keys(session_id, messages)
        return messages

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
        key = await self._client.get(self.keys.result_key(session_id, message_id))
        content = await self._client.get(self.keys.result_content(session_id, message_id))
        if key is None:  # sent without a key: its record is kept by message id
            raw = await self._client.get(self.keys.sent(session_id, message_id))
            message = None if raw is None else idem_record(session_id, "", raw)
        else:
            raw = await self._client.get(self.keys.idem(session_id, text(key)))
            message = None if raw is None else idem_record(session_id, text(key), raw)
        if message is None or content is None:
            return message
        return replace(message, content=as_bytes(content))

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
