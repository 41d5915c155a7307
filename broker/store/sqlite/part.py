"""What every part of the SQLite store shares: the database, the caches it keeps
exact (one process owns the file), the fencing check and the row helpers."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import NotOwner
from broker.store.base import (
    DeliveryResult,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    event_order,
)
from broker.store.crypto import CredentialCipher
from broker.store.local import AckWaiters, LiveStates
from broker.store.sqlite.db import Database, Txn

log = logging.getLogger(__name__)

T = TypeVar("T")

_SWEEP_EVERY_ACKS = 1000
"""Forget acked messages past the idempotency TTL once per this many acks."""
_MAX_CURSOR = 2**62
_MESSAGE_COLUMNS = ("message_id, recipient, body, idempotency_key, sequence, accepted_at, "
                    "content")




def _message(session_id: str, row: Sequence[Any]) -> OutboxMessage:
    mid, to, body, key, seq, at, content = row[:7]
    return OutboxMessage(session_id=session_id, message_id=mid, to=to, body=body,
                         idempotency_key=key, sequence=int(seq), accepted_at=float(at),
                         content=None if content is None else bytes(content))


_RESULT_COLUMNS = "acked_at, refused_code, refused"
"""A message's result; select after `_MESSAGE_COLUMNS` (read by `_result`)."""


def _result(message_id: str, row: Sequence[Any]) -> DeliveryResult | None:
    """The result in `row[0:3]` (`_RESULT_COLUMNS`); None while unsettled."""
    acked_at, code, why = row[:3]
    if acked_at is None:
        return None
    return DeliveryResult(message_id, float(acked_at), int(code or 0), str(why or ""))


def _row_id(store_id: str) -> int | None:
    """The row number in an event or inbound id ("<n>-0"); None if it is not one."""
    head, tail = event_order(store_id)
    return head if head >= 0 and tail == 0 and head < _MAX_CURSOR else None


class SqlitePart:
    """State and helpers of the parts; SqliteStore sets the state up."""

    path: Path
    db: Database
    _cipher: CredentialCipher
    _event_log_size: int
    _idem_ttl_s: float
    _redeliver_after_s: float
    _inbound_retention_s: float | None
    _is_open: bool
    _sessions: dict[str, SessionRecord]
    _last: dict[str, StatusEvent]
    _with_credentials: set[str]
    _depth: dict[str, int]
    _fences: dict[str, int]
    _live: LiveStates
    _ack_waiters: AckWaiters[tuple[str, str]]
    _outbox_changed: dict[str, asyncio.Event]
    _inbound_changed: dict[str, asyncio.Event]
    _read_upto: dict[str, int]
    _acks_since_sweep: int
    _trimmed_upto: int
    outbox_messages: int
    outbox_acks: int

    async def open(self) -> None:
        raise NotImplementedError

    async def _ready(self) -> None:
        if not self._is_open:
            await self.open()

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
