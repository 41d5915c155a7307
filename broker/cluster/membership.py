"""Which broker instances are alive: a heartbeat score per instance in one sorted set."""

from __future__ import annotations

import time

import redis.asyncio as aioredis


class Membership:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str = "broker",
                 instance_id: str, ttl_s: float) -> None:
        self._client = client
        self._key = f"{key_prefix}:instances"
        self.instance_id = instance_id
        self.ttl_s = ttl_s

    async def heartbeat(self) -> None:
        await self._client.zadd(self._key, {self.instance_id: time.time()})

    async def live(self) -> list[str]:
        """Instances that heartbeated within the TTL; forgets the others."""
        now = time.time()
        await self._client.zremrangebyscore(self._key, "-inf", now - self.ttl_s)
        members = await self._client.zrangebyscore(self._key, now - self.ttl_s, "+inf")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def leave(self) -> None:
        await self._client.zrem(self._key, self.instance_id)
