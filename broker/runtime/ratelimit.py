"""Per-session send rate limits: a token bucket, checked before a message is queued.

The bucket arithmetic (`TokenBucket`) is a pure value object; where the
bucket's state lives is a separate, swappable limiter: in process for the
memory store, in Redis (one Lua script under the session's hash tag, timed by
the Redis clock) when several instances share a store, so they share one
bucket and a worker cannot multiply its rate by spreading calls across
instances. Whoever wires the process decides which, by passing the shared
Redis client and key layout or not (BrokerApp, where it wires the
coordinator); this module never inspects the store. A refused message is
never queued, so nothing over the limit can reach the upstream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.config import Settings
from broker.errors import RateLimited, StoreUnavailable
from broker.store.redis.keys import RedisKeys

_EPSILON = 1e-9


@dataclass(frozen=True)
class TokenBucket:
    """`rate` tokens per second refill a bucket holding at most `burst`; a message costs one."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")

    @classmethod
    def from_settings(cls, rate: float, burst: int) -> TokenBucket | None:
        """None when off (rate 0); burst 0 means one second's worth (at least 1)."""
        if rate <= 0:
            return None
        return cls(rate, burst if burst > 0 else max(1, math.ceil(rate)))

    def take(self, tokens: float, elapsed_s: float, cost: float = 1.0) -> tuple[float, float]:
        """(tokens left, 0.0) when allowed, else (tokens unchanged, seconds until allowed)."""
        tokens = min(float(self.burst), tokens + max(0.0, elapsed_s) * self.rate)
        if tokens >= cost - _EPSILON:  # float drift must not refuse a caller who waited
            return tokens - cost, 0.0
        return tokens, (cost - tokens) / self.rate


class RateLimiter(Protocol):
    limits: bool
    """False for a limiter that never refuses (the Send path then skips its checks)."""

    async def acquire(self, session_id: str) -> float:
        """Take one token: 0.0 when allowed, else how many seconds until one is available."""
        ...


class Unlimited:
    limits = False

    async def acquire(self, session_id: str) -> float:
        return 0.0


class LocalLimiter:
    """Buckets in this process: right for the memory store (one process owns everything)."""

    limits = True

    def __init__(self, bucket: TokenBucket, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket = bucket
        self.clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    async def acquire(self, session_id: str) -> float:
        now = self.clock()
        tokens, at = self._state.get(session_id, (float(self.bucket.burst), now))
        tokens, wait = self.bucket.take(tokens, now - at)
        self._state[session_id] = (tokens, now)
        return wait


# KEYS[1]: the bucket hash. ARGV: rate per second, burst.
# Returns {allowed, wait in microseconds}. Time is the Redis server's, so
# instances with skewed clocks still share one consistent bucket.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) / 1000000 * rate)
local wait = 0
local allowed = 0
if tokens >= 1 - 1e-9 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) / rate * 1000000)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'at', string.format('%.0f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, wait}
"""


class RedisLimiter:
    """One bucket per session in Redis, shared by every instance on that store."""

    limits = True

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, bucket: TokenBucket) -> None:
        self.keys = keys
        self.bucket = bucket
        self._take = client.register_script(_TAKE)

    async def acquire(self, session_id: str) -> float:
        # The bucket key carries the session's hash tag: same cluster slot as its
        # other keys, and DeleteSession's sweep of the session's keys removes it too.
        try:
            allowed, wait_us = await self._take(
                keys=[self.keys.rate(session_id)], args=[repr(self.bucket.rate), self.bucket.burst]
            )
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise StoreUnavailable(
                f"the rate limiter's Redis is unavailable ({type(exc).__name__}); nothing was "
                "accepted, retry shortly with the same idempotency key", retry_after_s=1.0,
            ) from exc
        return 0.0 if int(allowed) else int(wait_us) / 1_000_000


def rate_limiter(
    settings: Settings, *, redis: aioredis.Redis | None = None, keys: RedisKeys | None = None
) -> RateLimiter:
    """The limiter `settings` ask for: its buckets in `redis` (under `keys`, by
    default the layout of `settings.key_prefix`) when instances share that
    Redis, else in this process."""
    bucket = TokenBucket.from_settings(settings.rate_limit or 0.0, settings.rate_burst)
    if bucket is None:
        return Unlimited()
    if redis is not None:
        return RedisLimiter(redis, keys or RedisKeys(settings.key_prefix), bucket)
    return LocalLimiter(bucket)


async def admit(limiter: RateLimiter, session_id: str) -> None:
    """Take a token for one new message or raise RATE_LIMITED with the wait as RetryInfo."""
    wait = await limiter.acquire(session_id)
    if wait > 0:
        # Round up to the whole millisecond RetryInfo carries (plus a hair, as the
        # status mapping truncates), so a client retrying on time succeeds.
        wait = math.ceil(wait * 1000) / 1000 + 1e-6
        raise RateLimited(
            f"session {session_id!r} is over its send rate limit; retry in {wait * 1000:.0f} ms",
            session_id=session_id, retry_after_s=wait,
        )
