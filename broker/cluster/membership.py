"""Which broker instances are alive, and that each instance id runs in one process.

Liveness is a heartbeat score per instance in one sorted set. Uniqueness is a
claim key per instance id holding a random incarnation, renewed with the
heartbeat: a second process started with an id that is live is refused, so
two processes never share a lease or a consumer name.

The claim is also the liveness of every lease the instance holds
(`broker.cluster.rules`), so a heartbeat only ever *extends* the claim of its
own incarnation: once the claim expired, other instances may have taken its
leases over, and the process must give every session up and join again under
a new incarnation (`rejoin`), never quietly re-create the old one.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from broker.errors import BrokerError, ErrorReason
from broker.store.redis.keys import RedisKeys


class InstanceIdInUse(BrokerError):
    default_reason = ErrorReason.INSTANCE_ID_IN_USE


# KEYS: claim; ARGV: incarnation, ttl ms.  1: ours (renewed or taken anew); 0: another's
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: claim; ARGV: incarnation, ttl ms.  1: extended; 0: gone or another's
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: claim; ARGV: incarnation
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class _Incarnation:
    token: str


class Membership:
    def __init__(self, client: aioredis.Redis, *, keys: RedisKeys, instance_id: str,
                 ttl_s: float, incarnation: _Incarnation | None = None) -> None:
        self._client = client
        self._key = keys.instances
        self._claim_key = keys.instance_claim(instance_id)
        self._me = incarnation or _Incarnation(secrets.token_hex(8))
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._keys = keys
        self._release = client.register_script(_RELEASE)
        self.instance_id = instance_id
        self.ttl_s = ttl_s

    def on(self, client: aioredis.Redis) -> Membership:
        """The same membership over another client (the heartbeat thread's), sharing
        the incarnation: a rejoin there is what `leave` here releases."""
        return Membership(client, keys=self._keys, instance_id=self.instance_id,
                          ttl_s=self.ttl_s, incarnation=self._me)

    async def join(self) -> None:
        """Claim this instance id; wait out a dead predecessor's claim (up to 1.5 TTL),
        refuse one that is still renewed by a live process."""
        deadline = time.monotonic() + self.ttl_s * 1.5
        while not await self._claimed():
            if time.monotonic() >= deadline:
                raise InstanceIdInUse(
                    f"instance id {self.instance_id!r} is in use by another live broker "
                    "process on this Redis; give each process its own --instance-id "
                    "(or leave it unset for a generated one)")
            await asyncio.sleep(self.ttl_s / 10)
        await self._client.zadd(self._key, {self.instance_id: time.time()})

    async def _claimed(self) -> bool:
        return bool(await self._claim(keys=[self._claim_key],
                                      args=[self._me.token, int(self.ttl_s * 1000)]))

    async def heartbeat(self) -> bool:
        """Extend the claim and the heartbeat; False once the claim expired or another
        process took the id: every lease this process held may be someone else's."""
        if not await self._renew(keys=[self._claim_key],
                                 args=[self._me.token, int(self.ttl_s * 1000)]):
            return False
        await self._client.zadd(self._key, {self.instance_id: time.time()})
        return True

    async def rejoin(self) -> bool:
        """After a lost claim: claim the id again under a new incarnation, if free."""
        self._me.token = secrets.token_hex(8)
        if not await self._claimed():
            return False
        await self._client.zadd(self._key, {self.instance_id: time.time()})
        return True

    async def claimed(self, instance_ids: Collection[str]) -> set[str]:
        """Which of these instances hold their claim now (one EXISTS each, pipelined)."""
        ids = sorted(set(instance_ids))
        if not ids:
            return set()
        async with self._client.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.exists(self._keys.instance_claim(instance_id))
            found = await pipe.execute()
        return {i for i, n in zip(ids, found, strict=True) if n}

    async def live(self) -> dict[str, float]:
        """Instances that heartbeated within the TTL, with their last heartbeat (wall
        clock); forgets the others."""
        now = time.time()
        await self._client.zremrangebyscore(self._key, "-inf", now - self.ttl_s)
        members: Any = await self._client.zrangebyscore(self._key, now - self.ttl_s, "+inf",
                                                        withscores=True)
        return {(m.decode() if isinstance(m, bytes) else str(m)): float(score)
                for m, score in members}

    async def leave(self) -> None:
        await self._client.zrem(self._key, self.instance_id)
        await self._release(keys=[self._claim_key], args=[self._me.token])
