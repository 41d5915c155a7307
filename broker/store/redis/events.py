"""Status events and the owner's live report.

Every instance tails the one global event log, so StreamStatus on any
instance shows every session's transitions, whoever owns them. The append
writes the global log and the session's ``last`` hash in one script, which
ties two slots together: on Redis Cluster it needs its own split (not
supported yet).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from broker.store.base import EventPage, LiveState, StatusEvent, event_order
from broker.store.redis import scripts
from broker.store.redis.codecs import (
    event_from_json,
    event_row,
    event_to_json,
    live_fields,
    live_state,
    stream_rows,
    text,
)
from broker.store.redis.core import RedisCore, block_ms, guard
from broker.store.redis.scripts import fence_arg

_MAX_ID_PART = 2**64 - 1


class EventsPart(RedisCore):
    def _init_events(
        self, client: aioredis.Redis, *, event_log_size: int, state_ttl_s: float | None
    ) -> None:
        self._event_log_size = event_log_size
        self._state_ttl_ms = int(state_ttl_s * 1000) if state_ttl_s else 0
        self._append_event = client.register_script(scripts.APPEND_EVENT)
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
        """One script (APPEND_EVENT) logs the event and makes it the session's last."""
        sid = event.session_id
        entry_id = await self._append_event(
            keys=[self.keys.events, self.keys.last(sid), self.keys.fence(sid)],
            args=[fence_arg(fence), event_to_json(event), self._event_log_size,
                  self._state_ttl_ms],
        )
        return event.with_id(text(entry_id))

    @guard
    async def last_event(self, session_id: str) -> StatusEvent | None:
        entry_id, raw = await self._client.hmget(self.keys.last(session_id), ["id", "event"])
        if raw is None:
            return None
        return event_from_json(raw, text(entry_id) if entry_id is not None else None)

    @guard
    async def events_after(self, event_id: str, limit: int) -> EventPage:
        """Events strictly after the cursor; `gap` when the log may have trimmed one of them.

        Trimming (MAXLEN ~) only removes the oldest entries, and XINFO counts every
        entry ever added: if that exceeds the length, entries older than the first
        retained one are gone, so a cursor older than that entry may have missed
        some. One case is conservative: a cursor equal to the very last trimmed id
        also reports a gap (the caller resyncs from a snapshot; nothing is lost).
        """
        ms, n = event_order(event_id)
        if ms < 0 or ms > _MAX_ID_PART or n > _MAX_ID_PART:
            return EventPage(gap=True)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.xrange(self.keys.events, min=f"({ms}-{n}", max="+", count=max(limit, 1))
            pipe.xinfo_stream(self.keys.events)
            rows, info = await pipe.execute(raise_on_error=False)
        if isinstance(rows, Exception):
            raise rows
        if isinstance(info, Exception):  # no log yet: nothing was ever trimmed
            info = {}
        if _trimmed_past(info, (ms, n)):
            return EventPage(gap=True)
        events = [event_row(entry_id, raw) for entry_id, raw in rows]
        return EventPage(events[:limit] if limit > 0 else [])

    @guard
    async def latest_event_id(self) -> str:
        """The newest event id ("0-0" when none): where a live tail starts."""
        rows: Any = await self._client.xrevrange(self.keys.events, count=1)
        return text(rows[0][0]) if rows else "0-0"

    @guard
    async def tail_events(self, after: str, block_s: float) -> list[StatusEvent]:
        """Events after the cursor, waiting up to block_s for the first one (the
        event tail of every instance, broker.cluster.tail)."""
        reply = await self._client.xread({self.keys.events: after}, count=1000,
                                         block=block_ms(block_s))
        return [event_row(entry_id, raw) for entry_id, raw in stream_rows(reply)]


def _trimmed_past(info: Mapping[str, Any], cursor: tuple[int, int]) -> bool:
    """Whether XINFO STREAM shows entries after `cursor` may have been removed."""
    deleted = info.get("max-deleted-entry-id")  # XDEL'd entries (not used by the broker)
    if deleted is not None and event_order(text(deleted)) > cursor:
        return True
    added, length = info.get("entries-added"), info.get("length", 0)
    if added is None or int(added) <= int(length):
        return False
    first = info.get("first-entry")
    if first is None or not first[0]:  # everything trimmed: only newer ones are safe
        last = info.get("last-generated-id")
        return last is None or event_order(text(last)) > cursor
    return event_order(text(first[0])) > cursor
