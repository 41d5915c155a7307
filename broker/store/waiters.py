"""Callers waiting for a Send's ack, woken by whoever records it (memory, SQLite)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from broker.store.base import DeliveryResult

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
            return await asyncio.wait_for(fut, timeout)
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
