"""Requests for one instance's sessions: a stream per instance, read by it alone.

Another instance that accepted a Send (or a stop, restart, logout, delete) for
a session it does not own looks up the owner in the lease and appends the
request to the owner's inbox. The owner reads its inbox with one blocking read
at a time, from where it left off, so a request survives a dropped connection
and no owner polls its sessions' outboxes while idle. Requests are hints: a
new owner reads its outbox from the start anyway, so one sent to an instance
that just let the session go is ignored there without loss.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.errors import StoreUnavailable
from broker.store.redis.codecs import stream_rows, text
from broker.store.redis.core import BLOCK_CHUNK_S, block_ms
from broker.store.redis.keys import RedisKeys

log = logging.getLogger(__name__)

INBOX_LEN = 1000
"""Approximate bound on an inbox stream (requests are read within a block chunk)."""
INBOX_TTL_S = 86_400
"""An inbox nobody reads (an instance id that never came back) goes after a day."""
_ERRORS = (rexc.RedisError, OSError, StoreUnavailable, asyncio.TimeoutError)

Handler = Callable[[str, str], Awaitable[None]]


class Inbox:
    def __init__(self, client: aioredis.Redis, *, keys: RedisKeys, instance_id: str) -> None:
        self._client = client
        self._keys = keys
        self._key = keys.instance_inbox(instance_id)
        self._cursor = "0-0"

    async def open(self) -> None:
        """Start after what is there now: requests to a past life of this id are void."""
        newest: Any = await self._client.xrevrange(self._key, count=1)
        self._cursor = text(newest[0][0]) if newest else "0-0"

    async def post(self, instance_id: str, op: str, session_id: str) -> None:
        key = self._keys.instance_inbox(instance_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"op": op, "sid": session_id}, maxlen=INBOX_LEN, approximate=True)
            pipe.expire(key, INBOX_TTL_S)
            await pipe.execute()

    async def run(self, handle: Handler) -> None:
        """Hand every request to `handle(op, session_id)`, in order, until cancelled."""
        while True:
            try:
                reply: Any = await self._client.xread({self._key: self._cursor}, count=500,
                                                      block=block_ms(BLOCK_CHUNK_S))
            except _ERRORS as exc:
                log.warning("instance inbox unreachable: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for entry_id, fields in stream_rows(reply):
                self._cursor = text(entry_id)
                values = {text(k): text(v) for k, v in fields.items()}
                try:
                    await handle(values.get("op", ""), values.get("sid", ""))
                except _ERRORS as exc:
                    log.warning("session %s: %s failed: %s", values.get("sid"),
                                values.get("op"), exc)
