"""In-process fan-out of status events to subscribers.

Publishing never blocks: each subscriber has a bounded queue, and one that
falls behind is cut off (it can resume from its last event id) instead of
stalling the broker or the other subscribers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Collection

from broker.store.base import StatusEvent

Filter = Callable[[StatusEvent], bool]


def session_filter(session_ids: Collection[str], tenant: str | None) -> Filter:
    ids = frozenset(session_ids)

    def matches(event: StatusEvent) -> bool:
        return (not ids or event.session_id in ids) and (tenant is None or event.tenant == tenant)

    return matches


class Subscription:
    """One reader's bounded queue of events.

    A deque and one plain future per wait, not an asyncio.Queue: with a thousand
    subscribers this runs a thousand times per event (docs/benchmarks.md).
    """

    def __init__(self, bus: StatusBus, matches: Filter, buffer: int) -> None:
        self._bus = bus
        self.matches = matches
        self.buffer = buffer
        self.queue: deque[StatusEvent] = deque()
        self.overflowed = False
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, event: StatusEvent) -> None:
        if self.overflowed or not self.matches(event):
            return
        if len(self.queue) >= self.buffer:
            self.overflowed = True
        else:
            self.queue.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> StatusEvent | None:
        """The next event, or None once this subscriber has overflowed (one reader)."""
        if self.overflowed:
            return None
        while not self.queue:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
            if self.overflowed and not self.queue:
                return None
        return self.queue.popleft()

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
