"""Sessions, their fencing tokens and sealed credentials."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from typing import Any

from broker.store.base import (
    SessionRecord,
)
from broker.store.sqlite.db import Txn
from broker.store.sqlite.part import (
    SqlitePart,
)

log = logging.getLogger(__name__)


class SessionsPart(SqlitePart):
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
