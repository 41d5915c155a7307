"""The per-session key-value area on Redis: one hash under the session's hash
tag (so `delete_session` removes it with the rest), one sealed value per field,
written by fenced scripts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from broker.store.crypto import CredentialCipher
from broker.store.redis import scripts
from broker.store.redis.codecs import as_bytes
from broker.store.redis.core import RedisCore, guard
from broker.store.redis.scripts import fence_arg


class KVPart(RedisCore):
    _cipher: CredentialCipher

    def _init_kv(self, client: aioredis.Redis) -> None:
        self._kv_set = client.register_script(scripts.KV_SET)
        self._kv_clear = client.register_script(scripts.KV_CLEAR)

    @guard
    async def kv_get(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        names = list(dict.fromkeys(keys))
        if not names:
            return {}
        raw = await self._client.hmget(self.keys.kv(session_id), names)
        return {name: self._cipher.open_value(session_id, name, as_bytes(sealed))
                for name, sealed in zip(names, raw, strict=True) if sealed is not None}

    @guard
    async def kv_set(
        self, session_id: str, values: Mapping[str, bytes | None], *, fence: int | None = None
    ) -> None:
        sets: list[str | bytes] = []
        deletes: list[str] = []
        for name, value in values.items():
            if value is None:
                deletes.append(name)
            else:
                sets += [name, self._cipher.seal_value(session_id, name, value)]
        await self._kv_set(
            keys=[self.keys.kv(session_id), self.keys.fence(session_id)],
            args=[fence_arg(fence), len(sets) // 2, *sets, *deletes])

    @guard
    async def kv_clear(self, session_id: str, *, fence: int | None = None) -> None:
        await self._kv_clear(keys=[self.keys.kv(session_id), self.keys.fence(session_id)],
                             args=[fence_arg(fence)])
