"""Feeds every instance's status bus from the shared event log in Redis.

Owners only append events to the log; each instance's tail publishes them to
its local subscribers, so a dashboard connected anywhere sees every session.
The store's reader knows the log's shape (one stream, or shards on Redis
Cluster) and where it stands in it.
"""

from __future__ import annotations

import asyncio
import logging

from broker.errors import StoreUnavailable
from broker.runtime.bus import StatusBus
from broker.store.redis import RedisStore
from broker.store.redis.eventlog import EventReader

log = logging.getLogger(__name__)


class EventTail:
    def __init__(self, store: RedisStore, bus: StatusBus) -> None:
        self.store = store
        self.bus = bus
        self._task: asyncio.Task[None] | None = None
        self._reader: EventReader | None = None

    async def start(self) -> None:
        self._reader = await self.store.event_reader()
        self._task = asyncio.create_task(self._run(self._reader), name="event-tail")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # ends it; never swallows our own cancel
        if self._reader is not None:
            await self._reader.close()

    async def _run(self, reader: EventReader) -> None:
        while True:
            try:
                events = await self.store.tail_read(reader, block_s=2.0)
            except StoreUnavailable as exc:
                log.warning("event tail paused: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for event in events:
                self.bus.publish(event)
