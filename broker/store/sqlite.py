"""The SQLite store: the zero-configuration default that survives a restart.

One broker process on one machine, the most common start, gets everything the
Redis store keeps (sessions, sealed credentials, the outbox and its
idempotency records, the status event log, inbound messages with consumer
groups) in one local file, with Python's own `sqlite3`, in WAL mode. No query
runs on the event loop (see `broker.store.sqlite_db`): writes share group
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
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import NotOwner, OutboxFull
from broker.store.base import (
    Accepted,
    DeliveryResult,
    EventPage,
    InboundDelivery,
    InboundRecord,
    LiveState,
    OneAtATime,
    OutboxBatch,
    OutboxBatchResult,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    event_from_json,
    event_order,
    event_to_json,
    new_message_id,
)
from broker.store.crypto import CredentialCipher
from broker.store.sqlite_db import Database, Txn

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_V1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('fence_counter', 0), ('events_trimmed_upto', 0);
CREATE TABLE fences (session_id TEXT PRIMARY KEY, token INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE sessions (
  session_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, enabled INTEGER NOT NULL,
  created_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE credentials (
  session_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE outbox (
  session_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, depth INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE messages (
  id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, sequence INTEGER NOT NULL,
  message_id TEXT NOT NULL, recipient TEXT NOT NULL, body TEXT NOT NULL,
  idempotency_key TEXT NOT NULL, accepted_at REAL NOT NULL, acked_at REAL);
CREATE UNIQUE INDEX messages_by_key ON messages (session_id, idempotency_key);
CREATE UNIQUE INDEX messages_by_id ON messages (session_id, message_id);
CREATE INDEX messages_unacked ON messages (session_id, sequence) WHERE acked_at IS NULL;
CREATE INDEX messages_acked ON messages (acked_at) WHERE acked_at IS NOT NULL;
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, event TEXT NOT NULL);
CREATE TABLE last_events (
  session_id TEXT PRIMARY KEY, event_id INTEGER NOT NULL, event TEXT NOT NULL);
CREATE TABLE inbound (
  id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
  upstream_id TEXT NOT NULL, sender TEXT NOT NULL, body TEXT NOT NULL,
  received_at REAL NOT NULL);
CREATE UNIQUE INDEX inbound_by_upstream ON inbound (session_id, upstream_id);
CREATE INDEX inbound_by_session ON inbound (session_id, id);
CREATE INDEX inbound_by_age ON inbound (session_id, received_at);
CREATE TABLE inbound_groups (
  session_id TEXT NOT NULL, grp TEXT NOT NULL, last_id INTEGER NOT NULL,
  PRIMARY KEY (session_id, grp)) WITHOUT ROWID;
CREATE TABLE inbound_pending (
  session_id TEXT NOT NULL, grp TEXT NOT NULL, inbound_id INTEGER NOT NULL,
  consumer TEXT NOT NULL, delivered_at REAL NOT NULL, deliveries INTEGER NOT NULL,
  PRIMARY KEY (session_id, grp, inbound_id)) WITHOUT ROWID;
"""

MIGRATIONS: tuple[str, ...] = (SCHEMA_V1,)
"""Schema steps in order; PRAGMA user_version counts those applied. Append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)

_SWEEP_EVERY_ACKS = 1000
"""Forget acked messages past the idempotency TTL once per this many acks."""
_MAX_CURSOR = 2**62
_MESSAGE_COLUMNS = "message_id, recipient, body, idempotency_key, sequence, accepted_at"




def _message(session_id: str, row: Sequence[Any]) -> OutboxMessage:
    mid, to, body, key, seq, at = row[:6]
    return OutboxMessage(session_id=session_id, message_id=mid, to=to, body=body,
                         idempotency_key=key, sequence=int(seq), accepted_at=float(at))


def _row_id(store_id: str) -> int | None:
    """The row number in an event or inbound id ("<n>-0"); None if it is not one."""
    head, tail = event_order(store_id)
    return head if head >= 0 and tail == 0 and head < _MAX_CURSOR else None


def _settle_waiters(waiters: list[asyncio.Future[DeliveryResult]],
                    result: DeliveryResult) -> None:
    for fut in waiters:
        if not fut.done():
            fut.set_result(result)


class SqliteStore(OneAtATime):
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
        self._live: dict[str, tuple[LiveState, float]] = {}
        self._ack_waiters: dict[tuple[str, str], list[asyncio.Future[DeliveryResult]]] = {}
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

    async def _ready(self) -> None:
        if not self._is_open:
            await self.open()

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

    async def close(self) -> None:
        self._closed = True
        if self._is_open:
            self._is_open = False
            await self.db.close()
            log.info("SQLite store %s: %d writes in %d transactions (outbox: %d messages "
                     "and %d acks)", self.path, self.db.writes, self.db.commits,
                     self.outbox_messages, self.outbox_acks)

    # -- helpers -----------------------------------------------------------------

    async def _write(self, fn: Callable[[Txn], T], *, durable: bool = True) -> T:
        await self._ready()
        return await self.db.write(fn, durable=durable)

    @staticmethod
    def _check(conn: sqlite3.Connection, session_id: str, fence: int | None) -> None:
        """Refuse a stale fencing token, inside the write's own transaction."""
        if fence is None:
            return
        row = conn.execute("SELECT token FROM fences WHERE session_id = ?",
                           (session_id,)).fetchone()
        if row is None or row[0] != fence:
            raise NotOwner(
                f"session {session_id!r}: fencing token {fence} is stale; another owner "
                "holds the session", session_id=session_id,
            )

    def _check_cached(self, session_id: str, fence: int | None) -> None:
        """The same check for calls that write nothing to the file."""
        if fence is not None and self._fences.get(session_id) != fence:
            raise NotOwner(
                f"session {session_id!r}: fencing token {fence} is stale; another owner "
                "holds the session", session_id=session_id,
            )

    # -- sessions ----------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        await self._ready()
        existing = self._sessions.get(record.session_id)
        if existing is not None:
            return existing, False

        def job(txn: Txn) -> tuple[SessionRecord, bool]:
            row = txn.conn.execute(
                "SELECT tenant, enabled, created_at FROM sessions WHERE session_id = ?",
                (record.session_id,)).fetchone()
            if row is not None:
                return SessionRecord(record.session_id, row[0], bool(row[1]), row[2]), False
            txn.conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                             (record.session_id, record.tenant, int(record.enabled),
                              record.created_at))
            txn.notify(lambda: self._sessions.__setitem__(record.session_id, record))
            return record, True

        outcome: tuple[SessionRecord, bool] = await self.db.write(job)
        return outcome

    async def get_session(self, session_id: str) -> SessionRecord | None:
        await self._ready()
        return self._sessions.get(session_id)

    async def list_sessions(self, tenant: str | None = None) -> list[SessionRecord]:
        await self._ready()
        return [r for r in sorted(self._sessions.values(), key=lambda r: r.session_id)
                if tenant is None or r.tenant == tenant]

    async def set_enabled(self, session_id: str, enabled: bool) -> None:
        def job(txn: Txn) -> None:
            changed = txn.conn.execute("UPDATE sessions SET enabled = ? WHERE session_id = ?",
                                       (int(enabled), session_id)).rowcount

            def update() -> None:
                record = self._sessions.get(session_id)
                if record is not None:
                    self._sessions[session_id] = replace(record, enabled=enabled)

            if changed:
                txn.notify(update)

        await self._write(job)

    async def delete_session(self, session_id: str) -> None:
        def job(txn: Txn) -> None:
            c = txn.conn
            if c.execute("SELECT 1 FROM fences WHERE session_id = ?", (session_id,)).fetchone():
                token = self._next_fence(c, session_id)  # a former owner's late writes fail
                txn.notify(lambda: self._fences.__setitem__(session_id, token))
            for table in ("sessions", "credentials", "outbox", "messages", "last_events",
                          "inbound", "inbound_groups", "inbound_pending"):
                c.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            txn.after(lambda: self._advance(session_id, None))
            txn.notify(lambda: self._forget(session_id))

        await self._write(job)

    def _forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._last.pop(session_id, None)
        self._with_credentials.discard(session_id)
        self._depth.pop(session_id, None)
        self._live.pop(session_id, None)
        self._wake_inbound(session_id)

    # -- fencing -----------------------------------------------------------------

    @staticmethod
    def _next_fence(conn: sqlite3.Connection, session_id: str) -> int:
        """One counter for all sessions, in the file: tokens grow across restarts and
        deletes, so a re-created session's owner never reuses one."""
        token = int(conn.execute(
            "UPDATE meta SET value = value + 1 WHERE name = 'fence_counter' RETURNING value"
        ).fetchone()[0])
        conn.execute("INSERT INTO fences VALUES (?, ?) ON CONFLICT (session_id) "
                     "DO UPDATE SET token = excluded.token", (session_id, token))
        return token

    async def new_fence(self, session_id: str) -> int:
        def job(txn: Txn) -> int:
            token = self._next_fence(txn.conn, session_id)
            txn.notify(lambda: self._fences.__setitem__(session_id, token))
            return token

        token: int = await self._write(job)
        return token

    # -- credentials -------------------------------------------------------------

    async def save_credentials(
        self, session_id: str, credentials: dict[str, Any], *, fence: int | None = None
    ) -> None:
        def job(txn: Txn) -> None:
            self._check(txn.conn, session_id, fence)
            sealed = self._cipher.encrypt(session_id, credentials)
            txn.conn.execute(
                "INSERT INTO credentials VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE "
                "SET key_id = excluded.key_id, sealed = excluded.sealed",
                (session_id, self._cipher.current_key_id, sealed))
            txn.notify(lambda: self._with_credentials.add(session_id))

        await self._write(job)

    async def load_credentials(self, session_id: str) -> dict[str, Any] | None:
        await self._ready()

        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute("SELECT sealed FROM credentials WHERE session_id = ?",
                               (session_id,)).fetchone()
            return None if row is None else self._cipher.decrypt(session_id, bytes(row[0]))

        return await self.db.read(read)

    async def has_credentials(self, session_id: str) -> bool:
        await self._ready()
        return session_id in self._with_credentials

    async def clear_credentials(self, session_id: str, *, fence: int | None = None) -> None:
        def job(txn: Txn) -> None:
            self._check(txn.conn, session_id, fence)
            txn.conn.execute("DELETE FROM credentials WHERE session_id = ?", (session_id,))
            txn.notify(lambda: self._with_credentials.discard(session_id))

        await self._write(job)

    # -- outbox ------------------------------------------------------------------

    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """One transaction (shared with whatever else is being written meanwhile):
        fence check, acks, key and depth checks, new messages, the claiming read."""
        if not batch.acks and not batch.messages and fence is None:
            return OutboxBatchResult([], [])
        # A batch with new messages is synced before any Send hears back; one of
        # only acks need not be (lost with a power loss, they mean resends that the
        # upstream de-duplicates), which saves a sync per delivered message.
        result: OutboxBatchResult = await self._write(
            lambda txn: self._apply(txn, session_id, batch, max_depth, at, fence),
            durable=bool(batch.messages))
        return result

    def _apply(
        self, txn: Txn, sid: str, batch: OutboxBatch, max_depth: int, at: float,
        fence: int | None,
    ) -> OutboxBatchResult:
        c = txn.conn
        self._check(c, sid, fence)
        row = c.execute("SELECT last_seq, depth FROM outbox WHERE session_id = ?",
                        (sid,)).fetchone()
        last_seq, depth = (int(row[0]), int(row[1])) if row else (0, 0)
        acked: list[DeliveryResult] = []
        newly_acked: list[DeliveryResult] = []
        for mid in batch.acks:
            found = c.execute("SELECT acked_at FROM messages WHERE session_id = ? AND "
                              "message_id = ?", (sid, mid)).fetchone()
            if found is not None and found[0] is not None:
                acked.append(DeliveryResult(mid, float(found[0])))
                continue
            if found is not None:
                c.execute("UPDATE messages SET acked_at = ? WHERE session_id = ? AND "
                          "message_id = ?", (at, sid, mid))
                depth -= 1
            acked.append(DeliveryResult(mid, at))
            newly_acked.append(acked[-1])
        accepted: list[Accepted | OutboxFull] = []
        fresh: list[OutboxMessage] = []
        for new in batch.messages:
            known = c.execute(f"SELECT {_MESSAGE_COLUMNS}, acked_at FROM messages "
                              "WHERE session_id = ? AND idempotency_key = ?",
                              (sid, new.idempotency_key)).fetchone()
            if known is not None:
                message = _message(sid, known)
                done = None if known[6] is None else DeliveryResult(message.message_id,
                                                                    float(known[6]))
                accepted.append(Accepted(message, True, done))
                continue
            if depth >= max_depth:
                accepted.append(OutboxFull(
                    f"outbox of {sid!r} holds {depth} undelivered messages",
                    session_id=sid, retry_after_s=1.0,
                ))
                continue
            last_seq += 1
            depth += 1
            message = OutboxMessage(
                session_id=sid, message_id=new_message_id(), to=new.to, body=new.body,
                idempotency_key=new.idempotency_key, sequence=last_seq, accepted_at=at,
            )
            c.execute("INSERT INTO messages (session_id, sequence, message_id, recipient, body, "
                      "idempotency_key, accepted_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (sid, last_seq, message.message_id, new.to, new.body,
                       new.idempotency_key, at))
            fresh.append(message)
            accepted.append(Accepted(message, False))
        if row is None and not (batch.acks or batch.messages):
            return OutboxBatchResult(acked, accepted)
        c.execute("INSERT INTO outbox VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE "
                  "SET last_seq = excluded.last_seq, depth = excluded.depth",
                  (sid, last_seq, depth))
        claimed: list[OutboxMessage] = []
        unread = False
        if batch.claim and fresh:
            upto = self._read_upto.get(sid, 0)
            if upto == fresh[0].sequence - 1:  # nothing older unread: the new ones, in order
                claimed = fresh
            else:
                claimed = [_message(sid, r) for r in c.execute(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND "
                    "acked_at IS NULL AND sequence > ? ORDER BY sequence LIMIT ?",
                    (sid, upto, len(fresh)))]
            if claimed:
                newest_read = claimed[-1].sequence
                txn.after(lambda: self._advance(sid, newest_read))
                upto = max(upto, newest_read)
            unread = last_seq > upto
        self._acks_since_sweep += len(newly_acked)
        self.outbox_messages += len(fresh)
        self.outbox_acks += len(newly_acked)
        if self._acks_since_sweep >= _SWEEP_EVERY_ACKS:
            self._acks_since_sweep = 0
            c.execute("DELETE FROM messages WHERE acked_at IS NOT NULL AND acked_at < ?",
                      (at - self._idem_ttl_s,))

        def notify() -> None:
            self._depth[sid] = depth
            for result in newly_acked:
                waiters = self._ack_waiters.pop((sid, result.message_id), None)
                if waiters:
                    _settle_waiters(waiters, result)
            if fresh:
                self._outbox_event(sid).set()

        txn.notify(notify)
        return OutboxBatchResult(acked, accepted, claimed, unread)

    def _advance(self, session_id: str, sequence: int | None) -> None:
        """The reader has read up to `sequence` (None: the outbox is gone, start over)."""
        if sequence is None:
            self._read_upto.pop(session_id, None)
        else:
            self._read_upto[session_id] = max(self._read_upto.get(session_id, 0), sequence)

    def _outbox_event(self, session_id: str) -> asyncio.Event:
        event = self._outbox_changed.get(session_id)
        if event is None:
            event = self._outbox_changed[session_id] = asyncio.Event()
        return event

    async def find_by_key(self, session_id: str, idempotency_key: str) -> Accepted | None:
        await self._ready()

        def read(conn: sqlite3.Connection) -> Accepted | None:
            row = conn.execute(f"SELECT {_MESSAGE_COLUMNS}, acked_at FROM messages "
                               "WHERE session_id = ? AND idempotency_key = ?",
                               (session_id, idempotency_key)).fetchone()
            if row is None:
                return None
            message = _message(session_id, row)
            done = None if row[6] is None else DeliveryResult(message.message_id, float(row[6]))
            return Accepted(message, True, done)

        return await self.db.read(read)

    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        await self._ready()
        self._check_cached(session_id, fence)
        return 0  # one process: there is no other reader to take over from

    async def pending(
        self, session_id: str, limit: int, after_sequence: int = 0, *, fence: int | None = None
    ) -> list[OutboxMessage]:
        """In the writer thread, where the reader's position lives (see `claim`)."""
        if limit <= 0:
            await self._ready()
            self._check_cached(session_id, fence)
            return []

        def job(txn: Txn) -> list[OutboxMessage]:
            self._check(txn.conn, session_id, fence)
            window = txn.conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND "
                "acked_at IS NULL ORDER BY sequence LIMIT ?", (session_id, limit)).fetchall()
            out = [_message(session_id, r) for r in window if int(r[4]) > after_sequence]
            if out:
                newest = out[-1].sequence
                txn.after(lambda: self._advance(session_id, newest))
            return out

        out: list[OutboxMessage] = await self._write(job)
        return out

    async def result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        await self._ready()

        def read(conn: sqlite3.Connection) -> DeliveryResult | None:
            row = conn.execute("SELECT acked_at FROM messages WHERE session_id = ? AND "
                               "message_id = ?", (session_id, message_id)).fetchone()
            return None if row is None or row[0] is None else DeliveryResult(message_id,
                                                                              float(row[0]))

        return await self.db.read(read)

    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None:
        """Registered before the look-up, so an ack committed meanwhile still wakes it."""
        await self._ready()
        if timeout <= 0:
            return await self.result(session_id, message_id)
        key = (session_id, message_id)
        fut: asyncio.Future[DeliveryResult] = asyncio.get_running_loop().create_future()
        self._ack_waiters.setdefault(key, []).append(fut)
        try:
            done = await self.result(session_id, message_id)
            if done is not None:
                return done
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._ack_waiters.get(key)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._ack_waiters[key]

    async def outbox_depth(self, session_id: str) -> int:
        await self._ready()
        return self._depth.get(session_id, 0)

    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        await self._ready()
        event = self._outbox_event(session_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    # -- live state (of this process: not worth a disk write, and it must not
    # outlive the process anyway) -------------------------------------------------

    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None:
        await self._ready()
        self._check_cached(session_id, fence)
        self._live[session_id] = (live, time.monotonic() + ttl_s)

    async def get_live(self, session_id: str) -> LiveState | None:
        entry = self._live.get(session_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

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
        fence: int | None = None,
    ) -> InboundRecord | None:
        retention = self._inbound_retention_s

        def job(txn: Txn) -> InboundRecord | None:
            c = txn.conn
            self._check(c, session_id, fence)
            cursor = c.execute(
                "INSERT INTO inbound (session_id, upstream_id, sender, body, received_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_id, upstream_id) DO NOTHING",
                (session_id, upstream_id, sender, body, at))
            if cursor.rowcount == 0:
                return None
            row_id = int(cursor.lastrowid or 0)
            if retention:
                # As the memory store (and Redis's XTRIM MINID): what is past the
                # retention goes, acked or not, and its de-dup entry with it.
                old = [(session_id, r[0]) for r in c.execute(
                    "SELECT id FROM inbound WHERE session_id = ? AND received_at < ?",
                    (session_id, at - retention))]
                if old:
                    c.executemany("DELETE FROM inbound WHERE session_id = ? AND id = ?", old)
                    c.executemany("DELETE FROM inbound_pending WHERE session_id = ? AND "
                                  "inbound_id = ?", old)
            txn.notify(lambda: self._wake_inbound(session_id))
            return InboundRecord(session_id=session_id, inbound_id=f"{row_id}-0",
                                 upstream_id=upstream_id, sender=sender, body=body,
                                 received_at=at)

        record: InboundRecord | None = await self._write(job)
        return record

    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float
    ) -> list[InboundDelivery]:
        """Idle pending messages of the group claimed first, then new ones; blocks on
        an in-process wake-up, so a reader cancelled while blocked takes nothing."""
        if count <= 0:
            return []
        await self._ready()
        woken = self._inbound_event(session_id)  # before the read: no add slips between
        out = await self.db.write(lambda txn: self._take_inbound(
            txn, session_id, group, consumer, count), durable=False)
        if out or block_s <= 0:
            return out
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), block_s)
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
                "i.received_at FROM inbound_pending p JOIN inbound i ON i.id = p.inbound_id "
                "WHERE p.session_id = ? AND p.grp = ? AND p.delivered_at <= ? "
                "ORDER BY p.inbound_id LIMIT ?",
                (sid, group, now - self._redeliver_after_s, count)).fetchall()
            for row_id, deliveries, uid, sender, body, received in idle:
                c.execute("UPDATE inbound_pending SET consumer = ?, delivered_at = ?, "
                          "deliveries = ? WHERE session_id = ? AND grp = ? AND inbound_id = ?",
                          (consumer, now, deliveries + 1, sid, group, row_id))
                record = InboundRecord(sid, f"{row_id}-0", uid, sender, body, received)
                out.append(InboundDelivery(record, deliveries + 1))
        if len(out) < count:
            last_id = int(c.execute("SELECT last_id FROM inbound_groups WHERE session_id = ? "
                                    "AND grp = ?", (sid, group)).fetchone()[0])
            rows = c.execute(
                "SELECT id, upstream_id, sender, body, received_at FROM inbound WHERE "
                "session_id = ? AND id > ? ORDER BY id LIMIT ?",
                (sid, last_id, count - len(out))).fetchall()
            if rows:
                c.executemany("INSERT INTO inbound_pending VALUES (?, ?, ?, ?, ?, 1)",
                              [(sid, group, r[0], consumer, now) for r in rows])
                c.execute("UPDATE inbound_groups SET last_id = ? WHERE session_id = ? AND "
                          "grp = ?", (rows[-1][0], sid, group))
                out += [InboundDelivery(InboundRecord(sid, f"{r[0]}-0", r[1], r[2], r[3], r[4]),
                                        1) for r in rows]
        return out

    async def ack_inbound(self, session_id: str, group: str, inbound_ids: list[str]) -> int:
        rows = {row for row in map(_row_id, inbound_ids) if row is not None}
        if not rows:
            return 0

        def job(txn: Txn) -> int:
            return sum(txn.conn.execute(
                "DELETE FROM inbound_pending WHERE session_id = ? AND grp = ? AND "
                "inbound_id = ?", (session_id, group, row)).rowcount for row in rows)

        settled: int = await self._write(job, durable=False)  # lost: redelivered
        return settled
