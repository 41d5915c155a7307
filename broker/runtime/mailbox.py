"""The two wake-up primitives a session actor needs, small enough for thousands.

`Mailbox` is the actor's inbox; `Wake` is the delivery loop's doorbell. Both
are one deque or flag and at most one future, where asyncio.Queue / Event /
wait_for would cost kilobytes per idle session or a task per wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def settle(future: asyncio.Future[Any], value: Any) -> None:
    """Resolve `future` with `value` unless it is already done (a timer callback)."""
    if not future.done():
        future.set_result(value)


class Mailbox(Generic[T]):
    """An unbounded single-reader queue: what the actor needs of asyncio.Queue.

    An asyncio.Queue carries three deques and an Event, ~2 KB per session that a
    broker holding ten thousand idle sessions pays for nothing.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> T:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class Wake:
    """A flag one task waits on with a timeout: the delivery loop's doorbell.

    asyncio.wait_for(event.wait(), t) makes a task per wait (Python 3.11); the
    loop waits once per burst of Sends, so this plain future and timer do it.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> bool:
        """Whether the flag was set (False: the timeout passed first)."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, settle, waiter, None)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._set
