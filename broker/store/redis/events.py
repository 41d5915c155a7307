"""Status events and the owner's live report.

Every instance tails the shared event log, so StreamStatus on any instance
shows every session's transitions, whoever owns them. The log is a strategy
(broker.store.redis.eventlog): one stream on a single Redis, N shards on
Redis Cluster, where no script may touch two slots.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from broker.store.base import EventPage, LiveState, StatusEvent
from broker.store.redis import scripts
from broker.store.redis.codecs import event_from_json, live_fields, live_state, text
from broker.store.redis.core import RedisCore, guard
from broker.store.redis.eventlog import EventLog, EventReader, ShardedLog, SingleLog
from broker.store.redis.scripts import fence_arg


class EventsPart(RedisCore):
    def _init_events(
        self, client: aioredis.Redis, *, event_log_size: int, state_ttl_s: float | None,
        shards: int = 1,
    ) -> None:
        """`shards` > 1: the sharded log (Redis Cluster), else one stream."""
        self._state_ttl_ms = int(state_ttl_s * 1000) if state_ttl_s else 0
        self._log: EventLog = (ShardedLog(client, self.keys, event_log_size, shards)
                               if shards > 1 else SingleLog(client, self.keys, event_log_size))
        self._report_live = client.register_script(scripts.REPORT_LIVE)

    # live state
    @guard
    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None:
        await self._report_live(
            keys=[self.keys.live(session_id), self.keys.fence(session_id)],
            args=[fence_arg(fence), max(1, int(ttl_s * 1000)), *live_fields(live)],
        )

    @guard
    async def get_live(self, session_id: str) -> LiveState | None:
        raw: Any = await self._client.hgetall(self.keys.live(session_id))
        return live_state(raw) if raw else None

    # events
    @guard
    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        """Logs the event and makes it the session's last, fenced (see the log strategy)."""
        return event.with_id(await self._log.append(event, fence, self._state_ttl_ms))

    @guard
    async def last_event(self, session_id: str) -> StatusEvent | None:
        entry_id, raw = await self._client.hmget(self.keys.last(session_id), ["id", "event"])
        if raw is None:
            return None
        return event_from_json(raw, text(entry_id) if entry_id else None)

    @guard
    async def events_after(self, event_id: str, limit: int) -> EventPage:
        """Events strictly after the cursor; `gap` when the log may have trimmed one of them."""
        return await self._log.after(event_id, limit)

    @guard
    async def latest_event_id(self) -> str:
        """The newest event id ("0-0" when none)."""
        return await self._log.latest_id()

    @guard
    async def event_reader(self) -> EventReader:
        """A live tail of every instance's events, after the newest (broker.cluster.tail)."""
        return await self._log.reader()

    @guard
    async def tail_read(self, reader: EventReader, block_s: float) -> list[StatusEvent]:
        """The reader's next events, waiting up to block_s for the first (errors mapped)."""
        return await reader.read(block_s)
