"""The status event log and each session's last event."""

from __future__ import annotations

import logging
import sqlite3

from broker.store.base import (
    EventPage,
    StatusEvent,
    event_from_json,
    event_order,
    event_to_json,
)
from broker.store.sqlite.db import Txn
from broker.store.sqlite.part import (
    _MAX_CURSOR,
    SqlitePart,
)

log = logging.getLogger(__name__)


class EventsPart(SqlitePart):
    # -- events ------------------------------------------------------------------

    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        def job(txn: Txn) -> StatusEvent:
            c = txn.conn
            self._check(c, event.session_id, fence)
            cursor = c.execute("INSERT INTO events (session_id, event) VALUES (?, ?)",
                               (event.session_id, event_to_json(event)))
            row_id = int(cursor.lastrowid or 0)
            stored = event.with_id(f"{row_id}-0")
            c.execute("INSERT INTO last_events VALUES (?, ?, ?) ON CONFLICT (session_id) DO "
                      "UPDATE SET event_id = excluded.event_id, event = excluded.event",
                      (event.session_id, row_id, event_to_json(stored)))
            cutoff = row_id - self._event_log_size
            if cutoff > self._trimmed_upto:
                c.execute("DELETE FROM events WHERE id <= ?", (cutoff,))
                c.execute("UPDATE meta SET value = ? WHERE name = 'events_trimmed_upto'",
                          (cutoff,))
                txn.after(lambda: setattr(self, "_trimmed_upto",
                                          max(self._trimmed_upto, cutoff)))
            txn.notify(lambda: self._last.__setitem__(event.session_id, stored))
            return stored

        stored: StatusEvent = await self._write(job)
        return stored

    async def last_event(self, session_id: str) -> StatusEvent | None:
        await self._ready()
        return self._last.get(session_id)

    async def events_after(self, event_id: str, limit: int) -> EventPage:
        """Events strictly after the cursor; `gap` when the log trimmed one of them."""
        await self._ready()
        after, _ = event_order(event_id)
        if after < 0:
            return EventPage(gap=True)
        if after >= _MAX_CURSOR:
            return EventPage()

        def read(conn: sqlite3.Connection) -> EventPage:
            trimmed = int(conn.execute(
                "SELECT value FROM meta WHERE name = 'events_trimmed_upto'").fetchone()[0])
            if after < trimmed:
                return EventPage(gap=True)
            rows = conn.execute("SELECT id, event FROM events WHERE id > ? ORDER BY id "
                                "LIMIT ?", (after, max(limit, 0))).fetchall()
            return EventPage([event_from_json(raw, f"{rid}-0") for rid, raw in rows])

        return await self.db.read(read)
