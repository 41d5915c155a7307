"""The outbox: accepted Sends in order, their idempotency records and acks; and
the live state of this process's sessions (in memory only)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3

from broker.errors import OutboxFull
from broker.store.base import (
    Accepted,
    DeliveryResult,
    LiveState,
    OutboxBatch,
    OutboxBatchResult,
    OutboxMessage,
    new_message_id,
    outbox_full,
)
from broker.store.sqlite.db import Txn
from broker.store.sqlite.part import (
    _MESSAGE_COLUMNS,
    _RESULT_COLUMNS,
    _SWEEP_EVERY_ACKS,
    SqlitePart,
    _message,
    _result,
)

log = logging.getLogger(__name__)


class OutboxPart(SqlitePart):
    # -- outbox ------------------------------------------------------------------

    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """One transaction (shared with whatever else is being written meanwhile):
        fence check, acks, key and depth checks, new messages, the claiming read."""
        if not (batch.acks or batch.refusals or batch.messages) and fence is None:
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
        settle = [DeliveryResult(mid, at) for mid in batch.acks]
        settle += [refusal.result(at) for refusal in batch.refusals]
        for outcome in settle:
            mid = outcome.message_id
            found = c.execute(f"SELECT {_RESULT_COLUMNS} FROM messages WHERE session_id = ? "
                              "AND message_id = ?", (sid, mid)).fetchone()
            earlier = None if found is None else _result(mid, found)
            if earlier is not None:
                acked.append(earlier)
                continue
            if found is not None:
                c.execute("UPDATE messages SET acked_at = ?, refused_code = ?, refused = ? "
                          "WHERE session_id = ? AND message_id = ?",
                          (at, outcome.refused_code, outcome.refused, sid, mid))
                depth -= 1
            acked.append(outcome)
            newly_acked.append(outcome)
        accepted: list[Accepted | OutboxFull] = []
        fresh: list[OutboxMessage] = []
        for new in batch.messages:
            known = c.execute(f"SELECT {_MESSAGE_COLUMNS}, {_RESULT_COLUMNS} FROM messages "
                              "WHERE session_id = ? AND idempotency_key = ?",
                              (sid, new.idempotency_key)).fetchone()
            if known is not None:
                message = _message(sid, known)
                accepted.append(Accepted(message, True, _result(message.message_id, known[7:])))
                continue
            if depth >= max_depth:
                accepted.append(outbox_full(sid, depth))
                continue
            last_seq += 1
            depth += 1
            message = OutboxMessage(
                session_id=sid, message_id=new_message_id(), to=new.to, body=new.body,
                idempotency_key=new.idempotency_key, sequence=last_seq, accepted_at=at,
                content=new.content,
            )
            c.execute("INSERT INTO messages (session_id, sequence, message_id, recipient, body, "
                      "idempotency_key, accepted_at, content) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (sid, last_seq, message.message_id, new.to, new.body,
                       new.idempotency_key, at, new.content))
            fresh.append(message)
            accepted.append(Accepted(message, False))
        if row is None and not (batch.acks or batch.refusals or batch.messages):
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
                self._ack_waiters.resolve((sid, result.message_id), result)
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
            row = conn.execute(f"SELECT {_MESSAGE_COLUMNS}, {_RESULT_COLUMNS} FROM messages "
                               "WHERE session_id = ? AND idempotency_key = ?",
                               (session_id, idempotency_key)).fetchone()
            if row is None:
                return None
            message = _message(session_id, row)
            return Accepted(message, True, _result(message.message_id, row[7:]))

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
            row = conn.execute(f"SELECT {_RESULT_COLUMNS} FROM messages WHERE session_id = ? "
                               "AND message_id = ?", (session_id, message_id)).fetchone()
            return None if row is None else _result(message_id, row)

        return await self.db.read(read)

    async def sent_message(self, session_id: str, message_id: str) -> OutboxMessage | None:
        """Kept as long as its idempotency record (`idempotency_ttl_s` after the ack)."""
        await self._ready()

        def read(conn: sqlite3.Connection) -> OutboxMessage | None:
            row = conn.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? "
                               "AND message_id = ?", (session_id, message_id)).fetchone()
            return None if row is None else _message(session_id, row)

        return await self.db.read(read)

    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None:
        """Registered before the look-up, so an ack committed meanwhile still wakes it."""
        await self._ready()
        if timeout <= 0:
            return await self.result(session_id, message_id)
        return await self._ack_waiters.wait((session_id, message_id), timeout,
                                            lambda: self.result(session_id, message_id))

    async def outbox_depth(self, session_id: str) -> int:
        await self._ready()
        return self._depth.get(session_id, 0)

    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        await self._ready()
        event = self._outbox_event(session_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        event.clear()

    # -- live state (of this process: not worth a disk write, and it must not
    # outlive the process anyway) -------------------------------------------------

    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None:
        await self._ready()
        self._check_cached(session_id, fence)
        self._live.report(session_id, live, ttl_s)

    async def get_live(self, session_id: str) -> LiveState | None:
        return self._live.get(session_id)
