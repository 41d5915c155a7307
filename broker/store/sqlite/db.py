"""SQLite plumbing of the embedded durable store: the one-process lock, schema
migrations, and the threads that keep every query off the event loop.

Writes go to one writer thread that owns the only writing connection. It takes
every write queued while its previous commit was syncing and applies them in
one transaction (a group commit): each write runs in its own SAVEPOINT, so one
that fails (say, a stale fencing token) leaves the others intact, and one
COMMIT with ``synchronous=FULL`` makes the whole group durable before any of
its callers hears back (a group of only writes marked not durable skips the
sync, see `Database.write`). Reads go to a reader thread with its own connection
(WAL lets it read while the writer writes) and always see every write whose
caller has been answered, because answers are sent only after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import BrokerError, StoreInUse, StoreSchemaError, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_GROUP = 512
"""Most writes one transaction takes: bounds how long one commit holds the others."""

_BUSY_TIMEOUT_MS = 10_000
"""Only a person's `sqlite3` shell can hold the database besides us; wait that out."""


class Txn:
    """What a write sees: the connection inside the group's transaction, and hooks.

    `after(fn)` runs `fn` in the writer thread once the group has committed (and
    never if it did not), to update caches that must not show uncommitted data.
    `notify(fn)` runs `fn` on the caller's event loop after the commit, even if
    the caller was cancelled meanwhile (waking waiters must not depend on it).
    """

    __slots__ = ("_after", "_notify", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._after: list[Callable[[], None]] = []
        self._notify: list[Callable[[], None]] = []

    def after(self, fn: Callable[[], None]) -> None:
        self._after.append(fn)

    def notify(self, fn: Callable[[], None]) -> None:
        self._notify.append(fn)


@dataclass(eq=False)
class _Job:
    fn: Callable[[Txn], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    durable: bool = True
    txn: Txn | None = None
    value: Any = None
    error: BaseException | None = None
    notify: list[Callable[[], None]] = field(default_factory=list)


def _settle(job: _Job) -> None:
    for fn in job.notify:
        try:
            fn()
        except Exception:  # a waiter's bookkeeping must not lose the caller's answer
            log.exception("sqlite store: post-commit notification failed")
    if job.future.done():
        return
    if job.error is not None:
        job.future.set_exception(job.error)
    else:
        job.future.set_result(job.value)


def unavailable(path: Path, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"the SQLite store at {path} failed ({type(exc).__name__}: {exc}); nothing of "
        "this call was stored: retry shortly (Send: with the same idempotency key)",
        retry_after_s=1.0,
    )


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class Database:
    """One SQLite database file, opened by one process at a time."""

    def __init__(self, path: Path, migrations: Sequence[str], *,
                 max_group: int = MAX_GROUP) -> None:
        self.path = path
        self._migrations = tuple(migrations)
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._lock_fd: int | None = None
        self._sync = "FULL"
        self.commits = 0
        """Transactions committed by the writer (the benchmark reports writes per commit)."""
        self.writes = 0

    @property
    def schema_version(self) -> int:
        return len(self._migrations)

    # -- opening -------------------------------------------------------------

    def open(self) -> int:
        """Lock, connect, migrate; returns the schema version found (0: a new file).

        Blocking: run it in a thread. On failure everything taken is released."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock()
            conn = self._connect()
            self._wconn = conn
            found = self._migrate(conn)
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
            self._rconn = self._reader.submit(self._connect, True).result()
            self._writer = threading.Thread(target=self._run_writer, name="sqlite-writer",
                                            daemon=True)
            self._writer.start()
            return found
        except BaseException:
            self._release()
            raise

    def _lock(self) -> None:
        """Refuse a second process: two owners of one session would fight upstream."""
        path = lock_path(self.path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"the SQLite database {self.path} is in use by another broker process (pid "
                f"{holder}); a SQLite store serves one process only. Stop the other broker, "
                "give this one its own --data-dir, or run several instances on Redis "
                "(--store redis://host:port/db)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _connect(self, reader: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if reader:
            conn.execute("PRAGMA query_only = 1")
            return conn
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreSchemaError(
                f"the SQLite database {self.path} cannot use write-ahead logging (journal "
                f"mode {mode!r}); put the data directory on a local file system"
            )
        # FULL: the WAL is synced on every commit, so what a caller was told is
        # stored survives a power loss, not only a crash of this process.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> int:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        target = self.schema_version
        if found > target:
            raise StoreSchemaError(
                f"the SQLite database {self.path} has schema version {found}, newer than "
                f"this broker's {target}: a newer release wrote it. Run that release (or a "
                "newer one), or point this broker at another --data-dir; it is left "
                "untouched"
            )
        for version in range(found, target):
            script = (f"BEGIN IMMEDIATE;\n{self._migrations[version]}\n"
                      f"PRAGMA user_version = {version + 1};\nCOMMIT;")
            try:
                conn.executescript(script)
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if found and found < target:
            log.warning("upgraded the SQLite database %s from schema version %d to %d",
                        self.path, found, target)
        return found

    # -- running -------------------------------------------------------------

    async def write(self, fn: Callable[[Txn], T], *, durable: bool = True) -> T:
        """Run `fn` in the next group transaction; returns once that has committed.

        `durable=False` is for writes that may be lost with a power loss (never with
        a crash of the process) because losing them is harmless: an upstream ack
        not recorded only means a resend, which the upstream de-duplicates. A group
        of only such writes commits with synchronous=NORMAL (no sync); the next
        durable commit syncs them too, in order."""
        if self._writer is None:
            raise unavailable(self.path, RuntimeError("the store is closed"))
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop, durable)
        self._queue.put(job)
        result: T = await job.future
        return result

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the reader connection, in one read transaction (one snapshot)."""
        reader, conn = self._reader, self._rconn
        if reader is None or conn is None:
            raise unavailable(self.path, RuntimeError("the store is closed"))

        def run() -> T:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(reader, run)
        except sqlite3.Error as exc:
            raise unavailable(self.path, exc) from exc

    def read_now(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read from the calling thread (opening only, before anything is served)."""
        assert self._wconn is not None
        return fn(self._wconn)

    def _run_writer(self) -> None:
        stop = False
        while not stop:
            job = self._queue.get()
            if job is None:
                break
            jobs = [job]
            while len(jobs) < self._max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                jobs.append(more)
            self._commit(jobs)

    def _commit(self, jobs: list[_Job]) -> None:
        conn = self._wconn
        assert conn is not None
        try:
            sync = "FULL" if any(job.durable for job in jobs) else "NORMAL"
            if sync != self._sync:
                conn.execute(f"PRAGMA synchronous = {sync}")
                self._sync = sync
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                txn = Txn(conn)
                conn.execute("SAVEPOINT job")
                try:
                    job.value = job.fn(txn)
                    job.txn = txn
                except BaseException as exc:
                    conn.execute("ROLLBACK TO job")
                    job.error = exc if isinstance(exc, BrokerError) else (
                        unavailable(self.path, exc) if isinstance(exc, sqlite3.Error) else exc)
                    if not isinstance(exc, BrokerError | sqlite3.Error):
                        log.error("sqlite store: a write failed", exc_info=exc)
                conn.execute("RELEASE job")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            log.error("sqlite store: commit of %d writes failed: %s", len(jobs), exc)
            for job in jobs:
                job.txn, job.value = None, None
                job.error = unavailable(self.path, exc)
        else:
            self.commits += 1
            self.writes += len(jobs)
        for job in jobs:
            if job.txn is not None:
                for hook in job.txn._after:
                    hook()
                job.notify = job.txn._notify
            with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                job.loop.call_soon_threadsafe(_settle, job)

    # -- closing -------------------------------------------------------------

    async def close(self) -> None:
        """Finish every queued write, then close and release the lock."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(writer.join)
        reader = self._reader
        if reader is not None and self._rconn is not None:
            rconn = self._rconn
            await asyncio.get_running_loop().run_in_executor(reader, rconn.close)
            self._rconn = None
        self._release()

    def _release(self) -> None:
        if self._reader is not None:
            if self._rconn is not None:
                self._reader.submit(self._rconn.close).result()
                self._rconn = None
            self._reader.shutdown(wait=True)
            self._reader = None
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.close()
            self._wconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
