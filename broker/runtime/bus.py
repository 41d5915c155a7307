"""In-process fan-out of status events to subscribers.

Publishing never blocks: each subscriber has a bounded queue, and one that
falls behind is cut off (it can resume from its last event id) instead of
stalling the broker or the other subscribers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from broker.store.base import StatusEvent

Filter = Callable[[StatusEvent], bool]


def session_filter(session_ids: Collection[str], tenant: str | None) -> Filter:
    ids = frozenset(session_ids)

    def matches(event: StatusEvent) -> bool:
        return (not ids or event.session_id in ids) and (tenant is None or event.tenant == tenant)

    return matches


class Subscription:
    def __init__(self, bus: StatusBus, matches: Filter, buffer: int) -> None:
        self._bus = bus
        self.matches = matches
        self.queue: asyncio.Queue[StatusEvent] = asyncio.Queue(maxsize=buffer)
        self.overflowed = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: StatusEvent) -> None:
        if self.overflowed.is_set() or not self.matches(event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed.set()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> StatusEvent | None:
        """The next event, or None once this subscriber has overflowed.

        One plain future per wait (one reader per subscription): with a thousand
        subscribers, two tasks and an asyncio.wait per event each were a large
        share of the fan-out's cost (docs/benchmarks.md).
        """
        if self.overflowed.is_set():
            return None
        while self.queue.empty():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if self.overflowed.is_set() and self.queue.empty():
                return None
        return self.queue.get_nowait()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StatusBus:
    def __init__(self, buffer: int = 1000) -> None:
        self.buffer = buffer
        self._subscribers: set[Subscription] = set()

    def subscribe(self, matches: Filter, buffer: int | None = None) -> Subscription:
        sub = Subscription(self, matches, buffer or self.buffer)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def publish(self, event: StatusEvent) -> None:
        for sub in tuple(self._subscribers):
            sub.offer(event)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
