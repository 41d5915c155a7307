"""The per-session key-value area (`Store.kv_get` / `kv_set` / `kv_clear`): one row
per key in table `kv` (migration 2, `broker.store.sqlite.schema`), each value
sealed on its own with the credential cipher (the session id and the key name
are its associated data)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from broker.store.sqlite.db import Txn
from broker.store.sqlite.part import SqlitePart

_READ_CHUNK = 500
"""Keys per SELECT ... IN (...): well under SQLite's bound on host parameters."""


class KVPart(SqlitePart):
    """Mixed into `SqliteStore`."""

    async def kv_get(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        await self._ready()
        names = list(dict.fromkeys(keys))

        def read(conn: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            for i in range(0, len(names), _READ_CHUNK):
                chunk = names[i:i + _READ_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows += conn.execute(
                    f"SELECT name, sealed FROM kv WHERE session_id = ? AND name IN ({marks})",
                    (session_id, *chunk)).fetchall()
            return rows

        rows = await self.db.read(read) if names else []
        return {name: self._cipher.open_value(session_id, name, bytes(sealed))
                for name, sealed in rows}

    async def kv_set(
        self, session_id: str, values: Mapping[str, bytes | None], *, fence: int | None = None
    ) -> None:
        kid = self._cipher.current_key_id
        # Sealed here, on the event loop's side: the writer thread only writes rows.
        sealed = [(name, None if v is None else self._cipher.seal_value(session_id, name, v))
                  for name, v in values.items()]

        def job(txn: Txn) -> None:
            self._check(txn.conn, session_id, fence)
            for name, value in sealed:
                if value is None:
                    txn.conn.execute("DELETE FROM kv WHERE session_id = ? AND name = ?",
                                     (session_id, name))
                else:
                    txn.conn.execute(
                        "INSERT INTO kv VALUES (?, ?, ?, ?) ON CONFLICT (session_id, name) "
                        "DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed",
                        (session_id, name, kid, value))

        await self._write(job)

    async def kv_clear(self, session_id: str, *, fence: int | None = None) -> None:
        def job(txn: Txn) -> None:
            self._check(txn.conn, session_id, fence)
            txn.conn.execute("DELETE FROM kv WHERE session_id = ?", (session_id,))

        await self._write(job)
