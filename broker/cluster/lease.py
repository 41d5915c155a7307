"""Ownership leases: a lease key per session plus a fencing counter (docs/reliability.md).

The lease value is "<instance>:<token>"; the token is the session's fencing
token (broker.store.redis.scripts), which grows on every grant, so a stale
owner can always be told apart from the current one, and every owner write
is checked against it. A lease key has no TTL: it stands for as long as its
instance's claim does (`broker.cluster.rules`), so holding a thousand leases
costs no more renewals than holding one. Taking a lease is a compare-and-set
in the session's own hash slot: from nothing, or from the exact value of an
owner whose claim is gone. Release is a compare-and-delete: an instance can
only drop a lease it still holds. A lease is never re-entered: a second process
claiming with the same instance id gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from broker.cluster.rules import holder_of
from broker.store.redis.keys import RedisKeys
from broker.store.redis.scripts import NEXT_TOKEN

VALUES_CHUNK = 2000
"""Lease reads per pipeline."""

# KEYS: lease, fence; ARGV: instance id, the value found ('' = none)
# The lease is granted only if it is still exactly what the caller judged.
_TAKE = NEXT_TOKEN + """
local current = redis.call('GET', KEYS[1])
if ARGV[2] == '' then
  if current then return false end
elseif current ~= ARGV[2] then
  return false
end
local token = next_token(KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token)
return token
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
    def __init__(self, client: aioredis.Redis, *, keys: RedisKeys, instance_id: str) -> None:
        self._client = client
        self._keys = keys
        self.instance_id = instance_id
        self._take = client.register_script(_TAKE)
        self._release = client.register_script(_RELEASE)

    async def acquire(self, session_id: str, found: str = "") -> Lease | None:
        """Take the lease if it is still `found` ('' = no lease); a fresh token."""
        token = await self._take(
            keys=[self._keys.lease(session_id), self._keys.fence(session_id)],
            args=[self.instance_id, found])
        if token is None:
            return None
        text = token.decode() if isinstance(token, bytes) else str(token)
        return Lease(session_id, self.instance_id, int(text))

    async def release(self, lease: Lease) -> None:
        await self._release(keys=[self._keys.lease(lease.session_id)], args=[lease.value])

    async def holder(self, session_id: str) -> str | None:
        """The instance named by the session's lease, if any (it may be dead)."""
        return holder_of(await self._client.get(self._keys.lease(session_id)))

    async def values(self, session_ids: list[str]) -> dict[str, bytes | str | None]:
        """The raw lease values, for `broker.cluster.rules.survey`."""
        if not session_ids:
            return {}
        # One GET per key in a pipeline, not MGET: on Redis Cluster each lease lives
        # in its session's own slot. Rounds read them only after a change.
        # In chunks, so a survey of 100,000 leases never packs (or parses) them all
        # in one event-loop turn.
        found: list[bytes | str | None] = []
        for start in range(0, len(session_ids), VALUES_CHUNK):
            async with self._client.pipeline(transaction=False) as pipe:
                for session_id in session_ids[start:start + VALUES_CHUNK]:
                    pipe.get(self._keys.lease(session_id))
                found += await pipe.execute()
        return dict(zip(session_ids, found, strict=True))
