"""What a status watcher sees: a snapshot or the missed events, then live ones.

The order matters and lives here, not in the API layer, so every front end
(gRPC today) gets the same guarantees: subscribe to the bus *before* reading
the snapshot or the log, so nothing that happens in between is missed; drop
what the snapshot or the replay already covered by per-session sequence.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Collection
from typing import TYPE_CHECKING, NamedTuple

from broker import validation
from broker.errors import SubscriberTooSlow
from broker.lifecycle.states import State
from broker.store.base import StatusEvent, Store, event_order

if TYPE_CHECKING:
    from broker.runtime.manager import SessionManager

#: Events replayed at most on resume; a cursor further behind than the store's
#: log gets a resync snapshot instead (the log is the real bound).
REPLAY_LIMIT = 1_000_000


class Origin(enum.Enum):
    """Where a watched event came from (the wire's `snapshot` / `resync` flags)."""

    SNAPSHOT = "snapshot"
    """A matching session's current state, first thing on a fresh watch."""
    RESYNC = "resync"
    """A snapshot sent because the resume cursor is older than the log holds."""
    REPLAY = "replay"
    """An event missed since the resume cursor, read back from the store's log."""
    LIVE = "live"
    """From the bus as it happened; the same object goes to every watcher."""


class Watched(NamedTuple):
    event: StatusEvent
    origin: Origin


async def snapshot(
    store: Store, session_ids: Collection[str], tenant: str | None
) -> list[StatusEvent]:
    """The last event of every matching session (a placeholder for never-started ones)."""
    wanted = set(session_ids)
    out: list[StatusEvent] = []
    for record in await store.list_sessions(tenant):
        if wanted and record.session_id not in wanted:
            continue
        last = await store.last_event(record.session_id)
        if last is None:
            last = StatusEvent(
                session_id=record.session_id, tenant=record.tenant, sequence=0,
                state=State.STOPPED, previous=State.STOPPED, reason="not started",
                at=record.created_at,
            )
        out.append(last)
    return out


async def watch(
    manager: SessionManager, session_ids: Collection[str], tenant: str, resume_after: str
) -> AsyncGenerator[Watched, None]:
    """See :meth:`SessionManager.watch`."""
    ids = [validation.session_id(s, "session_ids") for s in session_ids]
    wanted_tenant = validation.optional_tenant(tenant)
    for sid in ids:
        await manager.get(sid)  # NOT_FOUND before anything is sent
    with manager.subscribe(ids, wanted_tenant) as sub:
        seen: dict[str, int] = {}
        resync = False
        if resume_after:
            page = await manager.store.events_after(resume_after, REPLAY_LIMIT)
            resync = page.gap
            for event in () if page.gap else page.events:
                if sub.matches(event):
                    seen[event.session_id] = event.sequence
                    yield Watched(event, Origin.REPLAY)
        if not resume_after or resync:
            origin = Origin.RESYNC if resync else Origin.SNAPSHOT
            for event in await snapshot(manager.store, ids, wanted_tenant):
                seen[event.session_id] = event.sequence
                yield Watched(event, origin)
        # After a replay, a live event at or before the cursor was already seen
        # by the watcher on its previous stream (its sequence may be unknown here).
        cursor = event_order(resume_after) if resume_after and not resync else None
        while True:
            live = await sub.get()
            if live is None:
                raise SubscriberTooSlow(
                    "this subscriber fell too far behind and was cut off; resume from "
                    "the last event_id received", retry_after_s=0.1,
                )
            if live.sequence <= seen.get(live.session_id, 0):
                continue
            if cursor is not None and event_order(live.event_id) <= cursor:
                continue
            seen[live.session_id] = live.sequence
            yield Watched(live, Origin.LIVE)
