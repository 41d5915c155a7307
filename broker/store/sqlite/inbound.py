"""Inbound messages with consumer groups, redelivery and retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from broker.store.base import (
    INBOUND,
    NO_ORIGIN,
    InboundDelivery,
    InboundOrigin,
    InboundRecord,
    NewEntry,
)
from broker.store.sqlite.db import Txn
from broker.store.sqlite.part import (
    SqlitePart,
    _row_id,
)

log = logging.getLogger(__name__)


def topic_key(session_id: str, topic: str) -> str:
    """What the inbound tables' `session_id` column holds for a topic's entries: the
    session id for INBOUND, "<session>/<topic>" for the others (a session id never
    holds a "/"), so every topic shares the tables, the groups and the queries."""
    return session_id if topic == INBOUND else f"{session_id}/{topic}"


_COLUMNS = "id, upstream_id, sender, body, received_at, origin, content"
"""What a read of entries selects (never `media`: DownloadMedia reads it alone)."""


def _record(session_id: str, row: Sequence[Any]) -> InboundRecord:
    """An entry from a row of `_COLUMNS`."""
    row_id, uid, sender, body, received, origin, content = row
    return InboundRecord(session_id, f"{row_id}-0", uid, sender, body, received,
                         InboundOrigin.from_json(origin),
                         None if content is None else bytes(content))


class InboundPart(SqlitePart):
    # -- inbound -----------------------------------------------------------------

    def _inbound_event(self, session_id: str) -> asyncio.Event:
        event = self._inbound_changed.get(session_id)
        if event is None:
            event = self._inbound_changed[session_id] = asyncio.Event()
        return event

    def _wake_inbound(self, session_id: str) -> None:
        """Wake every reader blocked on the session once (the event is replaced)."""
        event = self._inbound_changed.pop(session_id, None)
        if event is not None:
            event.set()

    async def add_inbound(
        self, session_id: str, upstream_id: str, sender: str, body: str, at: float, *,
        fence: int | None = None, origin: InboundOrigin = NO_ORIGIN, topic: str = INBOUND,
        content: bytes | None = None, media: bytes | None = None,
    ) -> InboundRecord | None:
        [record] = await self.add_entries(
            session_id, [NewEntry(upstream_id, sender, body, origin, content, media)], at,
            topic=topic, fence=fence)
        return record

    async def inbound_media(self, session_id: str, upstream_id: str) -> bytes | None:
        await self._ready()

        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT media FROM inbound WHERE session_id = ? AND "
                               "upstream_id = ?", (session_id, upstream_id)).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        media: bytes | None = await self.db.read(read)
        return media

    async def add_entries(
        self, session_id: str, entries: Sequence[NewEntry], at: float, *, topic: str,
        fence: int | None = None,
    ) -> list[InboundRecord | None]:
        key = topic_key(session_id, topic)

        def job(txn: Txn) -> list[InboundRecord | None]:
            self._check(txn.conn, session_id, fence)
            added = [self._add_entry(txn, key, entry, at) for entry in entries]
            if any(added):
                txn.notify(lambda: self._wake_inbound(key))
            return [None if record is None else replace(record, session_id=session_id)
                    for record in added]

        records: list[InboundRecord | None] = await self._write(job)
        return records

    async def find_inbound(
        self, session_id: str, upstream_ids: Sequence[str], *, topic: str = INBOUND
    ) -> dict[str, InboundRecord]:
        await self._ready()
        key = topic_key(session_id, topic)
        wanted = list(dict.fromkeys(upstream_ids))

        def read(conn: sqlite3.Connection) -> dict[str, InboundRecord]:
            marks = ", ".join("?" * len(wanted))
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM inbound "
                f"WHERE session_id = ? AND upstream_id IN ({marks})", (key, *wanted))
            return {r[1]: _record(session_id, r) for r in rows}

        return await self.db.read(read) if wanted else {}

    def _add_entry(self, txn: Txn, key: str, entry: NewEntry, at: float) -> InboundRecord | None:
        """Append one entry under `key` (`topic_key`) and trim past the retention."""
        upstream_id, sender, body, origin, content, media = entry
        c = txn.conn
        cursor = c.execute(
            "INSERT INTO inbound (session_id, upstream_id, sender, body, received_at, "
            "origin, content, media) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id, upstream_id) DO NOTHING",
            (key, upstream_id, sender, body, at, origin.to_json(), content, media))
        if cursor.rowcount == 0:
            return None
        row_id = int(cursor.lastrowid or 0)
        retention = self._inbound_retention_s
        if retention:
            # As the memory store (and Redis's XTRIM MINID): what is past the
            # retention goes, acked or not, and its de-dup entry with it.
            old = [(key, r[0]) for r in c.execute(
                "SELECT id FROM inbound WHERE session_id = ? AND received_at < ?",
                (key, at - retention))]
            if old:
                c.executemany("DELETE FROM inbound WHERE session_id = ? AND id = ?", old)
                c.executemany("DELETE FROM inbound_pending WHERE session_id = ? AND "
                              "inbound_id = ?", old)
        return InboundRecord(session_id=key, inbound_id=f"{row_id}-0",
                             upstream_id=upstream_id, sender=sender, body=body,
                             received_at=at, origin=origin, content=content)

    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float, *,
        topic: str = INBOUND,
    ) -> list[InboundDelivery]:
        """Idle pending messages of the group claimed first, then new ones; blocks on
        an in-process wake-up, so a reader cancelled while blocked takes nothing."""
        if count <= 0:
            return []
        if topic != INBOUND:
            out = await self.read_inbound(topic_key(session_id, topic), group, consumer,
                                          count, block_s)
            return [replace(d, record=replace(d.record, session_id=session_id)) for d in out]
        await self._ready()
        woken = self._inbound_event(session_id)  # before the read: no add slips between
        out = await self.db.write(lambda txn: self._take_inbound(
            txn, session_id, group, consumer, count), durable=False)
        if out or block_s <= 0:
            return out
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(block_s):
                await woken.wait()
        if not woken.is_set():
            return []
        taken: list[InboundDelivery] = await self.db.write(lambda txn: self._take_inbound(
            txn, session_id, group, consumer, count, claim=False), durable=False)
        return taken

    def _take_inbound(
        self, txn: Txn, sid: str, group: str, consumer: str, count: int, claim: bool = True
    ) -> list[InboundDelivery]:
        c = txn.conn
        now = time.time()
        c.execute("INSERT INTO inbound_groups VALUES (?, ?, 0) ON CONFLICT DO NOTHING",
                  (sid, group))
        out: list[InboundDelivery] = []
        if claim:
            idle = c.execute(
                "SELECT p.inbound_id, p.deliveries, i.upstream_id, i.sender, i.body, "
                "i.received_at, i.origin, i.content FROM inbound_pending p "
                "JOIN inbound i ON i.id = p.inbound_id "
                "WHERE p.session_id = ? AND p.grp = ? AND p.delivered_at <= ? "
                "ORDER BY p.inbound_id LIMIT ?",
                (sid, group, now - self._redeliver_after_s, count)).fetchall()
            for row_id, deliveries, *rest in idle:
                c.execute("UPDATE inbound_pending SET consumer = ?, delivered_at = ?, "
                          "deliveries = ? WHERE session_id = ? AND grp = ? AND inbound_id = ?",
                          (consumer, now, deliveries + 1, sid, group, row_id))
                record = _record(sid, (row_id, *rest))
                out.append(InboundDelivery(record, deliveries + 1))
        if len(out) < count:
            last_id = int(c.execute("SELECT last_id FROM inbound_groups WHERE session_id = ? "
                                    "AND grp = ?", (sid, group)).fetchone()[0])
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM inbound WHERE "
                "session_id = ? AND id > ? ORDER BY id LIMIT ?",
                (sid, last_id, count - len(out))).fetchall()
            if rows:
                c.executemany("INSERT INTO inbound_pending VALUES (?, ?, ?, ?, ?, 1)",
                              [(sid, group, r[0], consumer, now) for r in rows])
                c.execute("UPDATE inbound_groups SET last_id = ? WHERE session_id = ? AND "
                          "grp = ?", (rows[-1][0], sid, group))
                out += [InboundDelivery(_record(sid, r), 1) for r in rows]
        return out

    async def release_inbound_consumer(
        self, session_id: str, group: str, consumer: str, *, topic: str = INBOUND
    ) -> None:
        """Consumers exist here only as names on pending deliveries: nothing to forget."""

    async def ack_inbound(
        self, session_id: str, group: str, inbound_ids: list[str], *, topic: str = INBOUND
    ) -> int:
        session_id = topic_key(session_id, topic)
        rows = {row for row in map(_row_id, inbound_ids) if row is not None}
        if not rows:
            return 0

        def job(txn: Txn) -> int:
            return sum(txn.conn.execute(
                "DELETE FROM inbound_pending WHERE session_id = ? AND grp = ? AND "
                "inbound_id = ?", (session_id, group, row)).rowcount for row in rows)

        settled: int = await self._write(job, durable=False)  # lost: redelivered
        return settled
