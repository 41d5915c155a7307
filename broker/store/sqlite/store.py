"""The SQLite store: the zero-configuration default that survives a restart.

One broker process on one machine, the most common start, gets everything the
Redis store keeps (sessions, sealed credentials, the outbox and its
idempotency records, the status event log, inbound messages with consumer
groups) in one local file, with Python's own `sqlite3`, in WAL mode. No query
runs on the event loop (see `broker.store.sqlite.db`): writes share group
commits in one writer thread, reads use a reader thread.

Durability: a write's caller is answered only after its transaction committed
with ``synchronous=FULL`` (the WAL is synced), so an accepted Send survives a
crash of the process and a power loss. Writes whose loss is harmless (upstream
acks, inbound hand-outs and their acks: a resend or a redelivery follows)
commit without the sync when nothing durable shares their transaction; they
still survive a crash of the process, and the next synced commit covers them.

One process only: the database is locked for the process that opened it, so
small per-session facts (session records, last events, outbox depths, which
sessions hold credentials, fencing tokens) are cached in memory, and waiters
(acks, new outbox messages, inbound messages) are woken in-process after the
commit, like the memory store's. Several instances need Redis.

Behaves like `MemoryStore` (the reference), with these differences: event and
inbound ids are ``<n>-0`` row numbers that keep growing across restarts;
acked messages are remembered for their idempotency key for
`idempotency_ttl_s` (like Redis), counted from their ack time.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from broker.store.base import (
    TOPICS,
    OneAtATime,
    SessionRecord,
    StatusEvent,
    event_from_json,
)
from broker.store.crypto import CredentialCipher
from broker.store.local import AckWaiters, LiveStates
from broker.store.sqlite.db import Database, Txn
from broker.store.sqlite.events import EventsPart
from broker.store.sqlite.inbound import InboundPart, topic_key
from broker.store.sqlite.kv import KVPart
from broker.store.sqlite.outbox import OutboxPart
from broker.store.sqlite.schema import MIGRATIONS
from broker.store.sqlite.sessions import SessionsPart

log = logging.getLogger(__name__)


class SqliteStore(SessionsPart, KVPart, OutboxPart, EventsPart, InboundPart, OneAtATime):
    """The `Store` in one SQLite file, for one broker process."""

    def __init__(
        self, path: str | Path, *, cipher: CredentialCipher, event_log_size: int = 10_000,
        idempotency_ttl_s: float = 86400.0, inbound_redeliver_after_s: float = 30.0,
        inbound_retention_s: float | None = None, migrations: Sequence[str] = MIGRATIONS,
    ) -> None:
        """`inbound_retention_s`: inbound messages received longer ago than this are
        trimmed (with their de-dup entries) as new ones arrive; None keeps them."""
        self.path = Path(path)
        self.db = Database(self.path, migrations)
        self._cipher = cipher
        self._event_log_size = max(1, event_log_size)
        self._idem_ttl_s = idempotency_ttl_s
        self._redeliver_after_s = inbound_redeliver_after_s
        self._inbound_retention_s = inbound_retention_s or None
        self._open_lock = asyncio.Lock()
        self._is_open = False
        self._closed = False
        # Caches, read and changed on the event loop only (changes arrive after the
        # commit, as notifications): one process owns the file, so they are exact.
        self._sessions: dict[str, SessionRecord] = {}
        self._last: dict[str, StatusEvent] = {}
        self._with_credentials: set[str] = set()
        self._depth: dict[str, int] = {}
        self._fences: dict[str, int] = {}
        self._live = LiveStates()
        self._ack_waiters: AckWaiters[tuple[str, str]] = AckWaiters()
        self._outbox_changed: dict[str, asyncio.Event] = {}
        self._inbound_changed: dict[str, asyncio.Event] = {}
        # Writer-thread state, touched only by write jobs and their after-commit hooks.
        self._read_upto: dict[str, int] = {}
        """Per session, the highest sequence handed to the reader (pending / claim)."""
        self._acks_since_sweep = 0
        self._trimmed_upto = 0
        self.outbox_messages = 0
        """Messages accepted and acks recorded by outbox writes (the benchmark divides
        them by the transactions they took)."""
        self.outbox_acks = 0

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}, cipher={self._cipher!r})"

    @property
    def cipher(self) -> CredentialCipher:
        return self._cipher

    # -- opening and closing -----------------------------------------------------

    async def open(self) -> None:
        """Lock the file, migrate it and load the caches; raises StoreInUse or
        StoreSchemaError. Every other call opens the store first if needed."""
        async with self._open_lock:
            if self._is_open:
                return
            if self._closed:
                raise RuntimeError("the SQLite store was closed")
            found = await asyncio.to_thread(self.db.open)
            try:
                await self.db.read(self._load)
            except BaseException:
                await self.db.close()
                raise
            self._is_open = True
            log.info("SQLite store %s (schema version %d%s)", self.path,
                     self.db.schema_version, ", created" if found == 0 else "")

    def _load(self, conn: sqlite3.Connection) -> None:
        for sid, tenant, enabled, created in conn.execute(
                "SELECT session_id, tenant, enabled, created_at FROM sessions"):
            self._sessions[sid] = SessionRecord(sid, tenant, bool(enabled), float(created))
        for sid, raw in conn.execute("SELECT session_id, event FROM last_events"):
            self._last[sid] = event_from_json(raw)
        self._depth = dict(conn.execute("SELECT session_id, depth FROM outbox WHERE depth > 0"))
        self._fences = dict(conn.execute("SELECT session_id, token FROM fences"))
        self._trimmed_upto = int(conn.execute(
            "SELECT value FROM meta WHERE name = 'events_trimmed_upto'").fetchone()[0])
        unknown: dict[str, int] = {}
        for sid, kid in conn.execute("SELECT session_id, key_id FROM credentials"):
            self._with_credentials.add(sid)
            if kid not in self._cipher.key_ids:
                unknown[kid] = unknown.get(kid, 0) + 1
        if unknown:
            log.error(
                "%d sessions in %s hold credentials sealed with key ids %s, which the "
                "configured credential keys (%s) do not include: they cannot reconnect "
                "and must pair again, unless the key that sealed them is restored",
                sum(unknown.values()), self.path, sorted(unknown),
                ", ".join(self._cipher.key_ids))

    # -- what spans the parts --------------------------------------------------

    async def delete_session(self, session_id: str) -> None:
        """Every table's rows of the session, in one transaction."""
        def job(txn: Txn) -> None:
            c = txn.conn
            if c.execute("SELECT 1 FROM fences WHERE session_id = ?", (session_id,)).fetchone():
                token = self._next_fence(c, session_id)  # a former owner's late writes fail
                txn.notify(lambda: self._fences.__setitem__(session_id, token))
            for table in ("sessions", "credentials", "kv", "outbox", "messages",
                          "last_events"):
                c.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            for table in ("inbound", "inbound_groups", "inbound_pending"):
                for topic in TOPICS:
                    c.execute(f"DELETE FROM {table} WHERE session_id = ?",
                              (topic_key(session_id, topic),))
            txn.after(lambda: self._advance(session_id, None))
            txn.notify(lambda: self._forget(session_id))

        await self._write(job)

    def _forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._last.pop(session_id, None)
        self._with_credentials.discard(session_id)
        self._depth.pop(session_id, None)
        self._live.forget(session_id)
        self._wake_inbound(session_id)

    async def close(self) -> None:
        self._closed = True
        if self._is_open:
            self._is_open = False
            await self.db.close()
            log.info("SQLite store %s: %d writes in %d transactions (outbox: %d messages "
                     "and %d acks)", self.path, self.db.writes, self.db.commits,
                     self.outbox_messages, self.outbox_acks)
