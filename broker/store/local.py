"""What the in-process stores (memory, SQLite) keep in memory only: callers waiting
for a Send's ack, and the live state of this process's sessions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from broker.store.base import DeliveryResult, LiveState

K = TypeVar("K", bound=Hashable)


class AckWaiters(Generic[K]):
    """Futures by key (a message), each resolved once by the write that acks it."""

    def __init__(self) -> None:
        self._futures: dict[K, list[asyncio.Future[DeliveryResult]]] = {}

    async def wait(self, key: K, timeout: float,
                   recorded: Callable[[], Awaitable[DeliveryResult | None]] | None = None,
                   ) -> DeliveryResult | None:
        """The ack, or None after `timeout`. `recorded` is looked at after the wait
        is registered, so an ack committed in between still wakes it."""
        fut: asyncio.Future[DeliveryResult] = asyncio.get_running_loop().create_future()
        self._futures.setdefault(key, []).append(fut)
        try:
            if recorded is not None and (done := await recorded()) is not None:
                return done
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            return None
        finally:
            waiting = self._futures.get(key)
            if waiting and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._futures[key]

    def resolve(self, key: K, result: DeliveryResult) -> None:
        for fut in self._futures.pop(key, []):
            if not fut.done():
                fut.set_result(result)


class LiveStates:
    """Each session's live state until its time-to-live runs out (monotonic clock)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[LiveState, float]] = {}

    def report(self, session_id: str, live: LiveState, ttl_s: float) -> None:
        self._states[session_id] = (live, time.monotonic() + ttl_s)

    def get(self, session_id: str) -> LiveState | None:
        entry = self._states.get(session_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def forget(self, session_id: str) -> None:
        self._states.pop(session_id, None)
