"""The shared status event log, one stream or sharded: the strategy a store is built with.

`SingleLog` (one Redis): one stream ``P:events``; the append writes it and
the session's ``last`` hash in one fenced script. `ShardedLog` (Redis
Cluster): N streams ``P:{e:<i>}:events``, a session's events always in shard
`shard_of(session_id)`, so no slot carries every event and a session's events
keep their order. A script cannot touch two slots, so the append is three
steps: the fenced ``last`` write (the session's slot), the XADD to the shard
(its slot, with the writer's fencing token in the entry), then naming the entry
in ``last``. A former owner's XADD that lands late, after its fence check
passed, is dropped by readers: its token is lower than one already read for
that session. Event ids are the shard's stream ids; resuming after one reads
every shard past it (ids are Redis server times, so shards interleave by time).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.store.base import EventPage, StatusEvent, event_order
from broker.store.redis import scripts
from broker.store.redis.codecs import event_row, event_to_json, stream_rows, text
from broker.store.redis.core import block_ms
from broker.store.redis.keys import RedisKeys, shard_of
from broker.store.redis.scripts import fence_arg

_MAX_ID_PART = 2**64 - 1
TAIL_COUNT = 1000


class EventReader(Protocol):
    """A live tail of the log (one per instance: broker.cluster.tail)."""

    async def read(self, block_s: float) -> list[StatusEvent]: ...

    async def close(self) -> None: ...


class EventLog(Protocol):
    async def append(self, event: StatusEvent, fence: int | None, ttl_ms: int) -> str:
        """Store `event` as the session's last and in the log; returns its event id."""
        ...

    async def after(self, event_id: str, limit: int) -> EventPage: ...

    async def latest_id(self) -> str: ...

    async def reader(self) -> EventReader:
        """A tail positioned after the newest event."""
        ...


def _bad_cursor(event_id: str) -> bool:
    ms, n = event_order(event_id)
    return ms < 0 or ms > _MAX_ID_PART or n > _MAX_ID_PART


async def _page(client: Any, key: str, event_id: str, limit: int) -> tuple[list[Any], bool]:
    """One stream's entries after the cursor, and whether it trimmed one of them.

    XINFO comes after XRANGE: a trim in between reports a gap (conservative)."""
    ms, n = event_order(event_id)
    rows: Any = await client.xrange(key, min=f"({ms}-{n}", max="+", count=max(limit, 1))
    try:
        info: Any = await client.xinfo_stream(key)
    except rexc.ResponseError:  # no log yet: nothing was ever trimmed
        info = {}
    return list(rows), _trimmed_past(info, (ms, n))


def _trimmed_past(info: Mapping[str, Any], cursor: tuple[int, int]) -> bool:
    """Whether XINFO STREAM shows entries after `cursor` may have been removed.

    Trimming (MAXLEN ~) only removes the oldest entries, and XINFO counts every
    entry ever added: if that exceeds the length, entries older than the first
    retained one are gone, so a cursor older than that entry may have missed
    some. A cursor equal to the very last trimmed id also reports a gap (the
    caller resyncs from a snapshot; nothing is lost).
    """
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


class SingleLog:
    """One stream for every session (a single Redis, or a single slot)."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, size: int) -> None:
        self._client = client
        self._keys = keys
        self._size = size
        self._append = client.register_script(scripts.APPEND_EVENT)

    async def append(self, event: StatusEvent, fence: int | None, ttl_ms: int) -> str:
        sid = event.session_id
        entry_id = await self._append(
            keys=[self._keys.events, self._keys.last(sid), self._keys.fence(sid)],
            args=[fence_arg(fence), event_to_json(event), self._size, ttl_ms])
        return text(entry_id)

    async def after(self, event_id: str, limit: int) -> EventPage:
        if _bad_cursor(event_id):
            return EventPage(gap=True)
        rows, gap = await _page(self._client, self._keys.events, event_id, limit)
        if gap:
            return EventPage(gap=True)
        events = [event_row(entry_id, raw) for entry_id, raw in rows]
        return EventPage(events[:limit] if limit > 0 else [])

    async def latest_id(self) -> str:
        rows: Any = await self._client.xrevrange(self._keys.events, count=1)
        return text(rows[0][0]) if rows else "0-0"

    async def reader(self) -> EventReader:
        return _SingleReader(self._client, self._keys.events, await self.latest_id())


class _SingleReader:
    def __init__(self, client: aioredis.Redis, key: str, cursor: str) -> None:
        self._client = client
        self._key = key
        self.cursor = cursor

    async def read(self, block_s: float) -> list[StatusEvent]:
        reply = await self._client.xread({self._key: self.cursor}, count=TAIL_COUNT,
                                         block=block_ms(block_s))
        events = [event_row(entry_id, raw) for entry_id, raw in stream_rows(reply)]
        if events:
            self.cursor = events[-1].event_id
        return events

    async def close(self) -> None:
        return None


class _Fences:
    """The highest fencing token read per session: a lower one is a former owner's late write."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    def admit(self, event: StatusEvent, token: int) -> bool:
        if token < self._seen.get(event.session_id, 0):
            return False
        self._seen[event.session_id] = token
        return True


def _token(raw: Mapping[Any, Any]) -> int:
    value = raw.get(b"f", raw.get("f"))
    return int(text(value)) if value else 0


class ShardedLog:
    """N streams, each under its own hash tag (Redis Cluster)."""

    def __init__(self, client: Any, keys: RedisKeys, size: int, shards: int) -> None:
        self._client = client
        self._keys = keys
        self._shards = shards
        self._size = max(1, -(-size // shards))  # per shard, so the total stays near `size`
        self._last = client.register_script(scripts.LAST_EVENT)
        self._last_id = client.register_script(scripts.LAST_EVENT_ID)

    def shard_key(self, session_id: str) -> str:
        return self._keys.event_shard(shard_of(session_id, self._shards))

    @property
    def shard_keys(self) -> list[str]:
        return [self._keys.event_shard(i) for i in range(self._shards)]

    async def append(self, event: StatusEvent, fence: int | None, ttl_ms: int) -> str:
        sid = event.session_id
        raw = event_to_json(event)
        last = self._keys.last(sid)
        await self._last(keys=[last, self._keys.fence(sid)],
                         args=[fence_arg(fence), raw, event.sequence, ttl_ms])
        entry_id = text(await self._client.xadd(
            self.shard_key(sid), {"e": raw, "f": fence_arg(fence) or "0"},
            maxlen=self._size, approximate=True))
        await self._last_id(keys=[last], args=[event.sequence, entry_id])
        return entry_id

    async def after(self, event_id: str, limit: int) -> EventPage:
        if _bad_cursor(event_id):
            return EventPage(gap=True)
        pages = await asyncio.gather(*(_page(self._client, key, event_id, limit)
                                       for key in self.shard_keys))
        if any(gap for _, gap in pages):
            return EventPage(gap=True)
        rows = sorted((row for page, _ in pages for row in page),
                      key=lambda row: event_order(text(row[0])))
        fences = _Fences()
        events = [e for entry_id, raw in rows
                  for e in [event_row(entry_id, raw)] if fences.admit(e, _token(raw))]
        return EventPage(events[:limit] if limit > 0 else [])

    async def latest_id(self) -> str:
        tops = await asyncio.gather(*(self._client.xrevrange(k, count=1)
                                      for k in self.shard_keys))
        ids = [text(rows[0][0]) for rows in tops if rows]
        return max(ids, key=event_order) if ids else "0-0"

    async def reader(self) -> EventReader:
        cursors = {}
        for key in self.shard_keys:
            rows: Any = await self._client.xrevrange(key, count=1)
            cursors[key] = text(rows[0][0]) if rows else "0-0"
        return _ShardedReader(self._client, cursors)


class _ShardedReader:
    """One blocking XREAD per shard kept in flight; each read returns what any
    shard delivered, merged in id order (a shard's own order is the session's)."""

    def __init__(self, client: Any, cursors: dict[str, str]) -> None:
        self._client = client
        self._cursors = cursors
        self._reads: dict[str, asyncio.Task[Any]] = {}
        self._fences = _Fences()
        self._block_s = 2.0

    def _start(self, key: str) -> None:
        read: Callable[[], Any] = lambda: self._client.xread(  # noqa: E731
            {key: self._cursors[key]}, count=TAIL_COUNT, block=block_ms(self._block_s))
        self._reads[key] = asyncio.ensure_future(read())

    async def read(self, block_s: float) -> list[StatusEvent]:
        self._block_s = block_s
        for key in self._cursors:
            if key not in self._reads:
                self._start(key)
        done, _ = await asyncio.wait(self._reads.values(), timeout=block_s + 1.0,
                                     return_when=asyncio.FIRST_COMPLETED)
        rows: list[Any] = []
        failure: BaseException | None = None
        for key, task in list(self._reads.items()):
            if task not in done:
                continue
            del self._reads[key]
            if task.exception() is not None:
                failure = task.exception()
                continue
            got = stream_rows(task.result())
            if got:
                self._cursors[key] = text(got[-1][0])
                rows.extend(got)
        if failure is not None and not rows:
            raise failure
        rows.sort(key=lambda row: event_order(text(row[0])))
        return [e for entry_id, raw in rows
                for e in [event_row(entry_id, raw)] if self._fences.admit(e, _token(raw))]

    async def close(self) -> None:
        reads, self._reads = list(self._reads.values()), {}
        for task in reads:
            task.cancel()
        for task in reads:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
