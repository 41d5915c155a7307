"""Ownership leases: `SET NX PX` plus a fencing counter (DESIGN section 5).

The lease value is "<instance>:<token>"; the token is the session's fencing
token (broker.store.redis.scripts), which grows on every grant, so a stale
owner can always be told apart from the current one, and every owner write
is checked against it. Renew and release are compare-and-set scripts: an
instance can only extend or drop a lease it still holds. A lease is never
re-entered: a second process claiming with the same instance id gets none.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from broker.store.redis.keys import RedisKeys
from broker.store.redis.scripts import NEXT_TOKEN

# KEYS: lease, fence; ARGV: instance id, ttl ms
_ACQUIRE = NEXT_TOKEN + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = next_token(KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return token
"""

# KEYS: lease; ARGV: expected value, ttl ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease; ARGV: expected value
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Lease:
    session_id: str
    instance_id: str
    token: int

    @property
    def value(self) -> str:
        return f"{self.instance_id}:{self.token}"


def _holder(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text.rsplit(":", 1)[0]


class LeaseClient:
    def __init__(self, client: aioredis.Redis, *, keys: RedisKeys, instance_id: str,
                 ttl_s: float, pipeline_scripts: bool = True) -> None:
        """`pipeline_scripts`: False on Redis Cluster, whose pipelines refuse EVALSHA;
        renewals then go as concurrent calls."""
        self._client = client
        self._pipeline_scripts = pipeline_scripts
        self._keys = keys
        self.instance_id = instance_id
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def acquire(self, session_id: str) -> Lease | None:
        token = await self._acquire(
            keys=[self._keys.lease(session_id), self._keys.fence(session_id)],
            args=[self.instance_id, self.ttl_ms])
        if token is None:
            return None
        text = token.decode() if isinstance(token, bytes) else str(token)
        return Lease(session_id, self.instance_id, int(text))

    async def renew(self, leases: list[Lease]) -> dict[str, bool]:
        """Renew many leases in one round trip; False where the lease is gone."""
        if not leases:
            return {}
        results: list[Any]
        if self._pipeline_scripts:
            pipe = self._client.pipeline(transaction=False)
            for lease in leases:
                await self._renew(keys=[self._keys.lease(lease.session_id)],
                                  args=[lease.value, self.ttl_ms], client=pipe)
            results = await pipe.execute()
        else:
            results = list(await asyncio.gather(*(
                self._renew(keys=[self._keys.lease(lease.session_id)],
                            args=[lease.value, self.ttl_ms]) for lease in leases)))
        return {lease.session_id: bool(ok) for lease, ok in zip(leases, results, strict=True)}

    async def release(self, lease: Lease) -> None:
        await self._release(keys=[self._keys.lease(lease.session_id)], args=[lease.value])

    async def holder(self, session_id: str) -> str | None:
        """The instance holding the session's lease, if any."""
        return _holder(await self._client.get(self._keys.lease(session_id)))

    async def holders(self, session_ids: list[str]) -> dict[str, str | None]:
        if not session_ids:
            return {}
        # One GET per key in a pipeline rather than MGET: on Redis Cluster the
        # leases live in every session's own slot, which MGET refuses.
        async with self._client.pipeline(transaction=False) as pipe:
            for sid in session_ids:
                pipe.get(self._keys.lease(sid))
            values = await pipe.execute()
        return {sid: _holder(v) for sid, v in zip(session_ids, values, strict=True)}
