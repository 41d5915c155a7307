"""The Redis store, one module per concern.

- `keys`: the key layout, the one definition every Redis user shares
- `scripts`: every Lua script, fencing included
- `codecs`: how values are encoded in Redis and decoded back
- `connect`: one client per URL scheme (single server, Redis Cluster, Sentinel)
- `durability`: when a write counts as accepted (primary only, or a replica too)
- `eventlog`: the shared event log, one stream or sharded, and its live reader
- `groups`: consumer groups created on demand
- `acks`: pub/sub wake-ups for `wait_result`
- `core`: the shared client state and the error mapping
- `sessions`, `outbox`, `events`, `inbound`: the parts `RedisStore` is built from
"""

from __future__ import annotations

from broker.store.redis.keys import RedisKeys
from broker.store.redis.store import RedisStore

__all__ = ["RedisKeys", "RedisStore"]
