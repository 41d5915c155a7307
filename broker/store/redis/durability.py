"""What "accepted" means on Redis: written on the primary, or also on a replica.

The Redis store runs every outbox write (and every read for delivery) through
one `Durability` chosen at construction:

- `Local`: the script alone; the message is as safe as the primary's
  persistence (`appendonly` / `appendfsync`, checked at start by `inspect`).
- `Replica`: the script and then ``WAIT 1 <timeout>`` (``WAITAOF 0 1`` on Redis
  7.2+, so the replica has also written it to its append-only file) on the same
  connection; a write no replica confirmed in time is refused as
  STORE_UNAVAILABLE, and the caller retries with the same idempotency key.
  Reads for delivery wait too: the owner never sends upstream a message that a
  failover could still lose, so a retried Send cannot reach the upstream twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.commands.core import AsyncScript

from broker.errors import StoreUnavailable

log = logging.getLogger(__name__)

MODES = ("local", "replica")
REPLICA_WAIT_S = 2.0
"""How long a write waits for a replica's confirmation before it is refused."""


class Durability(Protocol):
    mode: str

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run an outbox script; return its reply once the write is as durable as promised."""
        ...


class Local:
    mode = "local"

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await script(keys=keys, args=args)


class Replica:
    """Waits for `replicas` replicas after each script, on the script's connection."""

    mode = "replica"

    def __init__(self, client: aioredis.Redis, *, replicas: int = 1,
                 timeout_s: float = REPLICA_WAIT_S) -> None:
        self._client = client
        self.replicas = replicas
        self._timeout_ms = max(1, int(timeout_s * 1000))
        self.waitaof: bool | None = None
        """WAITAOF (Redis 7.2+) instead of WAIT; None until the server was asked."""

    async def _detect(self) -> bool:
        info: Any = await self._client.info("server")
        version = tuple(int(p) for p in str(info.get("redis_version", "0")).split(".")[:2])
        self.waitaof = version >= (7, 2)
        log.info("durability replica: each accepted write waits for %d replica(s) with %s",
                 self.replicas, "WAITAOF (replica's append-only file)" if self.waitaof
                 else "WAIT (replica's memory; WAITAOF needs Redis 7.2+, this server is "
                 f"{info.get('redis_version')})")
        return self.waitaof

    async def run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        try:
            return await self._run(script, keys, args)
        except rexc.NoScriptError:
            # redis-py loads a pipeline's scripts once, before its retry loop: after a
            # failover, the retry on a new connection reached a primary without the
            # script, so it did not run. A new pipeline loads it where it runs now.
            log.info("durability replica: the Redis primary lacked the outbox script "
                     "(a failover?); loading it there and running the write again")
            return await self._run(script, keys, args)

    async def _run(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        waitaof = self.waitaof if self.waitaof is not None else await self._detect()
        async with self._client.pipeline(transaction=False) as pipe:
            await script(keys=keys, args=args, client=pipe)
            if waitaof:
                pipe.execute_command("WAITAOF", 0, self.replicas, self._timeout_ms)
            else:
                pipe.execute_command("WAIT", self.replicas, self._timeout_ms)
            reply, confirmed = await pipe.execute()
        got = int(confirmed[1]) if isinstance(confirmed, list) else int(confirmed)
        if got < self.replicas:
            raise StoreUnavailable(
                f"no Redis replica confirmed the write within {self._timeout_ms} ms "
                f"({got} of {self.replicas}); with --durability replica nothing is accepted "
                "until one has it: retry with the same idempotency key", retry_after_s=1.0)
        return reply


def durability_for(mode: str, client: aioredis.Redis) -> Durability:
    if mode == "replica":
        return Replica(client)
    if mode == "local":
        return Local()
    raise ValueError(f"unknown durability {mode!r} (use one of {', '.join(MODES)})")


@dataclass(frozen=True)
class Report:
    """What a crash can lose, for the startup log and Health."""

    summary: str
    warnings: tuple[str, ...] = ()


async def inspect(client: aioredis.Redis, mode: str) -> Report:
    """Read the server's persistence (CONFIG GET; tolerated when CONFIG is disabled)
    and say plainly what accepted messages a crash can lose."""
    try:
        aof: Any = await client.config_get("appendonly")
        fsync: Any = await client.config_get("appendfsync")
        appendonly, appendfsync = _value(aof, "appendonly"), _value(fsync, "appendfsync")
    except (rexc.RedisError, OSError) as exc:
        appendonly = appendfsync = ""
        log.warning("cannot read the Redis persistence settings (%s): CONFIG may be disabled; "
                    "make sure appendonly is on", exc)
    warnings: list[str] = []
    if appendonly == "no":
        local = "a crash of the Redis primary loses every accepted message not yet delivered"
        warnings.append("Redis appendonly is off: " + local)
    elif appendfsync == "always":
        local = "a crash of the Redis primary loses nothing accepted (appendfsync always)"
    elif appendfsync:
        local = (f"a crash of the Redis primary (appendfsync {appendfsync}) may lose the "
                 "last second of accepted messages")
        if mode == "local":
            warnings.append(f"Redis appendfsync is {appendfsync}: {local}")
    else:
        local = "Redis persistence unknown (CONFIG GET refused)"
    if mode == "replica":
        summary = ("durability replica: a message is accepted once a replica confirmed it; "
                   "a failover after a primary crash loses nothing accepted; locally "
                   + local)
    else:
        summary = (f"durability local: a message is accepted once the primary has it; {local}; "
                   "a failover to a replica that had not received it loses it")
    return Report(summary, tuple(warnings))


def _value(reply: Any, name: str) -> str:
    if not isinstance(reply, dict):
        return ""
    raw = reply.get(name, reply.get(name.encode(), ""))
    return raw.decode() if isinstance(raw, bytes) else str(raw)
