"""Ownership leases: `SET NX PX` plus a fencing counter (DESIGN section 5).

The lease value is "<instance>:<token>"; the token comes from a per-session
counter that grows on every new grant, so a stale owner can always be told
apart from the current one. Renew and release are compare-and-set scripts:
an instance can only extend or drop a lease it still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

# KEYS: lease, fence; ARGV: instance id, ttl ms
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local owner, token = string.match(current, '^(.*):(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return token
  end
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
return tostring(token)
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


class LeaseClient:
    def __init__(self, client: aioredis.Redis, *, key_prefix: str = "broker",
                 instance_id: str, ttl_s: float) -> None:
        self._client = client
        self._prefix = key_prefix
        self.instance_id = instance_id
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def _keys(self, session_id: str) -> tuple[str, str]:
        tag = f"{self._prefix}:{{s:{session_id}}}"
        return f"{tag}:lease", f"{tag}:fence"

    async def acquire(self, session_id: str) -> Lease | None:
        token = await self._acquire(keys=self._keys(session_id),
                                    args=[self.instance_id, self.ttl_ms])
        if token is None:
            return None
        return Lease(session_id, self.instance_id, int(token))

    async def renew(self, leases: list[Lease]) -> dict[str, bool]:
        """Renew many leases in one round trip; False where the lease is gone."""
        if not leases:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for lease in leases:
            await self._renew(keys=[self._keys(lease.session_id)[0]],
                              args=[lease.value, self.ttl_ms], client=pipe)
        results = await pipe.execute()
        return {lease.session_id: bool(ok) for lease, ok in zip(leases, results, strict=True)}

    async def release(self, lease: Lease) -> None:
        await self._release(keys=[self._keys(lease.session_id)[0]], args=[lease.value])

    async def owner(self, session_id: str) -> str | None:
        value = await self._client.get(self._keys(session_id)[0])
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        return text.rsplit(":", 1)[0]
