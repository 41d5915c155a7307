"""What every part of the Redis store shares: the client, the key layout, the
consumer groups, and the one mapping of Redis trouble to broker errors."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.errors import BrokerError, NotOwner, StoreUnavailable
from broker.store.redis.groups import ConsumerGroups
from broker.store.redis.keys import RedisKeys
from broker.store.redis.scripts import FENCED_REPLY

P = ParamSpec("P")
R = TypeVar("R")

BLOCK_CHUNK_S = 2.0
"""Longest single blocking call: well under the socket timeout, so a wait never
looks like a dead connection."""
_UNAVAILABLE_REPLIES = ("MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "UNBLOCKED",
                        "NOREPLICAS")
"""Replies that mean "not now" (a failover, a restart, a primary demoted under a
blocked read, too few replicas for min-replicas-to-write): retry shortly."""


_PIPELINE_ERROR = " of pipeline caused error: "


def server_reply(exc: rexc.ResponseError) -> str:
    """What the server answered. redis-py puts "Command # N (...) of pipeline caused
    error: " in front of a pipelined command's reply (the replica durability's
    script + WAIT pipeline): a fenced write there was an internal error, not
    NotOwner, while the primary failed over (tests/cluster/test_sentinel.py)."""
    text = str(exc)
    if text.startswith("Command # ") and _PIPELINE_ERROR in text:
        return text.split(_PIPELINE_ERROR, 1)[1]
    return text


def block_ms(seconds: float) -> int:
    """A blocking command's timeout, capped at BLOCK_CHUNK_S (and at least 1 ms)."""
    return max(1, int(min(seconds, BLOCK_CHUNK_S) * 1000))


class RedisCore:
    """The state the store's parts (sessions, outbox, events, inbound) build on."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, where: str = "") -> None:
        """`where`: how errors name the server (default: the client's host and port)."""
        self._client = client
        self.keys = keys
        self._groups = ConsumerGroups(client)
        self._where = where or _where(client)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"the Redis store at {self._where} is unavailable ({type(exc).__name__}: {exc}); "
            "retry shortly (Send: with the same idempotency key)",
            retry_after_s=1.0,
        )

    def _forget_session(self, session_id: str) -> None:
        """Drop what this process caches about a deleted session (parts extend it)."""


def _where(client: aioredis.Redis) -> str:
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return "?"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


S = TypeVar("S", bound=RedisCore)


def guard(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Turn Redis connection trouble into StoreUnavailable and a fenced script's
    refusal into NotOwner, in one place."""

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except BrokerError:
            raise
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from exc
        except (rexc.ReadOnlyError, rexc.OutOfMemoryError, rexc.NoScriptError) as exc:
            # NOSCRIPT: a script did not run (a primary that lost or never had it).
            raise self._unavailable(exc) from exc
        except (rexc.ClusterError, rexc.ClusterDownError, rexc.TryAgainError,
                rexc.MasterDownError, rexc.RedisClusterException) as exc:
            # Redis Cluster: no primary for a slot, redirections or retries run out
            # (during a failover or a slot migration): retry shortly, like a restart.
            raise self._unavailable(exc) from exc
        except rexc.ResponseError as exc:
            reply = server_reply(exc)
            if reply.startswith(_UNAVAILABLE_REPLIES):
                raise self._unavailable(exc) from exc
            if reply.startswith(FENCED_REPLY):
                raise NotOwner(f"refused a stale owner's write: {exc}") from exc
            raise

    functools.update_wrapper(wrapper, fn)
    return wrapper
