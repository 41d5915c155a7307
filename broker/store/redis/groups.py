"""Consumer groups, created on demand: the one place that knows BUSYGROUP and NOGROUP.

Both the outbox (the ``owners`` group) and inbound (one group per worker
group) read streams through groups that must exist first. A group is created
at the start of the stream ("0"), so entries stored before the first reader
count. It can vanish under a reader when its stream is deleted (with its
session, or by hand): NOGROUP then means create it again and retry once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc

T = TypeVar("T")


class ConsumerGroups:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._known: set[tuple[str, str]] = set()
        """(stream, group) pairs this process created or found existing."""

    async def ensure(self, key: str, group: str) -> None:
        """Create the group (and the stream) unless this process already knows it exists."""
        if (key, group) in self._known:
            return
        try:
            await self._client.xgroup_create(key, group, id="0", mkstream=True)
        except rexc.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # BUSYGROUP: another reader created it
                raise
        self._known.add((key, group))

    async def run(self, key: str, group: str, read: Callable[[], Awaitable[T]]) -> T:
        """`read` through the group, creating it first when needed and once more
        when it turns out missing (NOGROUP)."""
        await self.ensure(key, group)
        try:
            return await read()
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        self._known.discard((key, group))
        await self.ensure(key, group)
        return await read()
