"""What only the SQLite store promises: everything survives closing and reopening
the file (a restart), one process at a time, schema versions, sealed
credentials, fencing tokens kept in the file, and group commits."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from broker.errors import NotOwner, StoreInUse, StoreSchemaError
from broker.lifecycle.states import State
from broker.store.base import (
    NO_ORIGIN,
    DeliveryResult,
    InboundOrigin,
    LiveState,
    NewMessage,
    OutboxBatch,
    Refusal,
    SessionRecord,
    StatusEvent,
    Store,
)
from broker.store.crypto import CredentialCipher, CredentialDecryptError
from broker.store.memory import MemoryStore
from broker.store.sqlite import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from broker.store.sqlite.db import Txn
from tests.store.conftest import mark_acked, open_sqlite

WAIT_S = 10.0


def _event(session_id: str, sequence: int, state: State = State.OPEN) -> StatusEvent:
    return StatusEvent(session_id=session_id, tenant="t1", sequence=sequence, state=state,
                       previous=State.CONNECTING, reason=f"step {sequence}", at=float(sequence))


@pytest.fixture
async def reopen(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[SqliteStore]]]:
    """Open the test database; each call closes the previous store first (a restart)."""
    opened: list[SqliteStore] = []

    async def factory(**options: float) -> SqliteStore:
        if opened:
            await opened[-1].close()
        store = open_sqlite(tmp_path / "broker.db", **options)
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


# -- a restart forgets nothing -----------------------------------------------------


async def test_everything_survives_a_reopen(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    store = await reopen()
    await store.create_session(SessionRecord("s1", "t1", created_at=5.0))
    await store.create_session(SessionRecord("s2", "t2"))
    await store.set_enabled("s2", False)
    await store.save_credentials("s1", {"token": "tok", "keys": {"a": 1}})
    first = await store.enqueue("s1", "+1", "one", "k1", max_depth=10, at=1.0)
    second = await store.enqueue("s1", "+1", "two", "k2", max_depth=10, at=2.0)
    third = await store.enqueue("s1", "+1", "three", "k3", max_depth=10, at=3.0)
    await store.pending("s1", 10)  # read by the owner, never acked: still owed
    acked = await mark_acked(store, "s1", first.message.message_id, 4.0)
    events = [await store.append_event(_event("s1", i)) for i in range(1, 4)]
    inbound = await store.add_inbound("s1", "up-1", "+49", "hi", 1000.0)
    assert inbound is not None
    assert len(await store.read_inbound("s1", "g", "c1", 10, 0)) == 1  # delivered, unacked

    store = await reopen(inbound_redeliver_after_s=0.0)
    assert await store.get_session("s1") == SessionRecord("s1", "t1", True, 5.0)
    assert [r.session_id for r in await store.list_sessions()] == ["s1", "s2"]
    assert not (await store.get_session("s2") or SessionRecord("", "")).enabled
    assert await store.has_credentials("s1") and not await store.has_credentials("s2")
    assert await store.load_credentials("s1") == {"token": "tok", "keys": {"a": 1}}
    assert await store.outbox_depth("s1") == 2
    assert await store.pending("s1", 10) == [second.message, third.message]
    dup = await store.enqueue("s1", "+1", "one", "k1", max_depth=10, at=5.0)
    assert dup.duplicate and dup.result == acked
    fourth = await store.enqueue("s1", "+1", "four", "k4", max_depth=10, at=6.0)
    assert fourth.message.sequence == 4  # numbering goes on
    assert await store.last_event("s1") == events[-1]
    page = await store.events_after(events[0].event_id, 10)
    assert not page.gap and page.events == events[1:]
    newer = await store.append_event(_event("s1", 4))
    assert newer.event_id > events[-1].event_id  # ids keep growing across restarts
    # the worker that took the inbound message died with the process: redelivered
    again = await store.read_inbound("s1", "g", "c2", 10, 0)
    assert [(d.record, d.delivery_count) for d in again] == [(inbound, 2)]
    assert await store.add_inbound("s1", "up-1", "+49", "hi", 1001.0) is None  # still de-duped


async def test_claimed_but_unacked_messages_are_owed_after_a_reopen(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    store = await reopen()
    batch = OutboxBatch(messages=[NewMessage("+1", f"m{i}", f"k{i}") for i in range(3)],
                        claim=True)
    done = await store.apply_outbox("s1", batch, max_depth=10, at=1.0)
    assert [m.body for m in done.claimed] == ["m0", "m1", "m2"]
    store = await reopen()
    assert [m.body for m in await store.pending("s1", 10)] == ["m0", "m1", "m2"]


# -- fencing: the memory store's contract, on SQLite, and kept in the file ---------


@pytest.fixture(params=["memory", "sqlite"])
async def fenced(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    store: Store = MemoryStore() if request.param == "memory" else open_sqlite(
        tmp_path / "fenced.db")
    await store.create_session(SessionRecord("s1", "t1"))
    yield store
    await store.close()


async def test_every_owner_write_refuses_a_stale_token(fenced: Store) -> None:
    store = fenced
    old = await store.new_fence("s1")
    current = await store.new_fence("s1")
    assert current > old
    queued = await store.enqueue("s1", "+1", "a", "ka", max_depth=10, at=1.0)  # unfenced
    mid = queued.message.message_id
    live = LiveState(State.OPEN, "me", 1.0, 1.0)
    stale_writes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.apply_outbox("s1", OutboxBatch(acks=[mid],
                                   messages=[NewMessage("+1", "b", "kb")]),
                                   max_depth=10, at=2.0, fence=old),
        lambda: mark_acked(store, "s1", mid, 2.0, fence=old),
        lambda: store.claim_outbox("s1", fence=old),
        lambda: store.pending("s1", 10, fence=old),
        lambda: store.append_event(_event("s1", 1), fence=old),
        lambda: store.report_live("s1", live, 10.0, fence=old),
        lambda: store.add_inbound("s1", "up-1", "+49", "x", 1.0, fence=old),
        lambda: store.save_credentials("s1", {"token": "stale"}, fence=old),
        lambda: store.clear_credentials("s1", fence=old),
    ]
    for write in stale_writes:
        with pytest.raises(NotOwner) as refused:
            await write()
        assert refused.value.reason == "NOT_OWNER"
    # nothing of a refused write was stored
    assert [m.body for m in await store.pending("s1", 10)] == ["a"]
    assert await store.result("s1", mid) is None
    assert await store.find_by_key("s1", "kb") is None
    assert await store.last_event("s1") is None
    assert await store.get_live("s1") is None
    assert await store.read_inbound("s1", "g", "c", 10, 0) == []
    assert await store.load_credentials("s1") is None
    # the current token and unfenced writes go through
    await store.save_credentials("s1", {"token": "ok"}, fence=current)
    assert await store.load_credentials("s1") == {"token": "ok"}
    assert (await mark_acked(store, "s1", mid, 3.0, fence=current)).acked_at == 3.0
    await store.append_event(_event("s1", 1), fence=current)
    await store.append_event(_event("s1", 2))
    await store.clear_credentials("s1", fence=current)
    assert await store.load_credentials("s1") is None


async def test_tokens_grow_across_delete_and_the_old_owner_stays_refused(fenced: Store) -> None:
    store = fenced
    before = await store.new_fence("s1")
    await store.delete_session("s1")
    with pytest.raises(NotOwner):
        await store.append_event(_event("s1", 1), fence=before)
    await store.create_session(SessionRecord("s1", "t1"))
    after = await store.new_fence("s1")
    assert after > before
    assert (await store.new_fence("other")) > after  # one counter for every session


async def test_tokens_keep_growing_across_a_reopen(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    store = await reopen()
    old = await store.new_fence("s1")
    store = await reopen()
    with pytest.raises(NotOwner):  # the token is in the file: still current
        await store.append_event(_event("s1", 1), fence=old - 1)
    await store.append_event(_event("s1", 1), fence=old)
    assert await store.new_fence("s1") > old


# -- one process, schema versions --------------------------------------------------


async def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first = open_sqlite(tmp_path / "broker.db")
    await first.open()
    second = open_sqlite(tmp_path / "broker.db")
    with pytest.raises(StoreInUse) as refused:
        await second.open()
    message = refused.value.message
    assert "in use by another broker process" in message and "Redis" in message
    await first.close()
    await second.open()  # free again once the first one is gone
    await second.close()


async def test_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = open_sqlite(path)
    await store.create_session(SessionRecord("s1", "t1"))
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = open_sqlite(path)
    with pytest.raises(StoreSchemaError) as refused:
        await newer.open()
    assert f"schema version {SCHEMA_VERSION + 1}, newer than this broker's " \
           f"{SCHEMA_VERSION}" in refused.value.message
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT session_id FROM sessions").fetchall() == [("s1",)]
    again = open_sqlite(path)  # the refusal released the lock
    with pytest.raises(StoreSchemaError):
        await again.open()


async def test_an_older_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = open_sqlite(path)
    await store.create_session(SessionRecord("s1", "t1"))
    await store.enqueue("s1", "+1", "kept", "k1", max_depth=10, at=1.0)
    await store.close()
    step = "CREATE TABLE upgraded (x INTEGER); INSERT INTO upgraded VALUES (42);"
    newer = SqliteStore(path, cipher=open_sqlite(path).cipher, migrations=(*MIGRATIONS, step))
    await newer.open()
    try:
        assert [m.body for m in await newer.pending("s1", 10)] == ["kept"]
        assert await newer.get_session("s1") == SessionRecord("s1", "t1")
    finally:
        await newer.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert conn.execute("SELECT x FROM upgraded").fetchall() == [(42,)]


async def test_a_database_of_the_previous_release_gains_refusals_and_origins(
    tmp_path: Path
) -> None:
    """Schema 2 (before refusals and inbound origins): its rows read as before and
    the new columns work on them."""
    path = tmp_path / "broker.db"
    with sqlite3.connect(path) as conn:
        conn.executescript("".join(MIGRATIONS[:2]))
        conn.execute("INSERT INTO sessions VALUES ('s1', 't1', 1, 1.0)")
        conn.execute("INSERT INTO outbox VALUES ('s1', 2, 2)")
        conn.executemany(
            "INSERT INTO messages (session_id, sequence, message_id, recipient, body, "
            "idempotency_key, accepted_at) VALUES ('s1', ?, ?, '+1', ?, ?, 1.0)",
            [(1, "m-1", "one", "k1"), (2, "m-2", "two", "k2")])
        conn.execute("INSERT INTO inbound (session_id, upstream_id, sender, body, received_at) "
                     "VALUES ('s1', 'u1', '+2', 'old hello', 1.0)")
        conn.execute("PRAGMA user_version = 2")
    store = open_sqlite(path)
    await store.open()
    try:
        assert [m.body for m in await store.pending("s1", 10)] == ["one", "two"]
        batch = OutboxBatch(acks=["m-1"], refusals=[Refusal("m-2", 463, "no token")])
        await store.apply_outbox("s1", batch, max_depth=10, at=2.0)
        assert (await store.result("s1", "m-1")) == DeliveryResult("m-1", 2.0)
        assert (await store.result("s1", "m-2")) == DeliveryResult("m-2", 2.0, 463, "no token")
        origin = InboundOrigin("7@lid", "Ana", "g@g.us", 3.0)
        await store.add_inbound("s1", "u2", "+2", "new hello", 4.0, origin=origin)
        got = await store.read_inbound("s1", "g", "c", 10, 0)
        assert [(d.record.body, d.record.origin) for d in got] == [
            ("old hello", NO_ORIGIN), ("new hello", origin)]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_failed_upgrade_leaves_the_old_version(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    store = open_sqlite(path)
    await store.create_session(SessionRecord("s1", "t1"))
    await store.close()
    broken = "CREATE TABLE half (x INTEGER); THIS IS NOT SQL;"
    newer = SqliteStore(path, cipher=store.cipher, migrations=(*MIGRATIONS, broken))
    with pytest.raises(sqlite3.Error):
        await newer.open()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert "half" not in tables


# -- credentials at rest -----------------------------------------------------------


def _all_bytes(directory: Path) -> bytes:
    """The database, its WAL and its shared memory, as they are on disk."""
    return b"".join(p.read_bytes() for p in sorted(directory.glob("broker.db*")) if p.is_file())


async def test_the_file_holds_no_plaintext_credential(
    reopen: Callable[..., Awaitable[SqliteStore]], tmp_path: Path,
) -> None:
    secret = "tok-3f9a1c-very-secret"
    store = await reopen()
    await store.save_credentials("s1", {"token": secret, "noise": "n" * 50})
    raw = _all_bytes(tmp_path)
    assert secret.encode() not in raw
    assert b"very-secret" not in raw
    assert await store.load_credentials("s1") == {"token": secret, "noise": "n" * 50}
    store = await reopen()  # after a checkpoint into the main file too
    assert secret.encode() not in _all_bytes(tmp_path)


# -- group commit ------------------------------------------------------------------


async def test_a_batch_is_one_transaction(reopen: Callable[..., Awaitable[SqliteStore]]) -> None:
    store = await reopen()
    queued = [await store.enqueue("s1", "+1", f"m{i}", f"k{i}", max_depth=100, at=1.0)
              for i in range(10)]
    before = store.db.commits
    batch = OutboxBatch(acks=[q.message.message_id for q in queued],
                        messages=[NewMessage("+1", f"n{i}", f"n{i}") for i in range(50)],
                        claim=True)
    done = await store.apply_outbox("s1", batch, max_depth=100, at=2.0)
    assert len(done.acked) == 10 and len(done.claimed) == 50
    assert store.db.commits == before + 1


async def test_writes_queued_during_a_commit_share_the_next_one(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    """Hold the writer in a write of our own; everything queued meanwhile (Sends of
    20 sessions) then goes into one transaction, and each caller hears back only
    after it committed."""
    store = await reopen()
    gate, holding = threading.Event(), threading.Event()

    def hold(txn: Txn) -> None:
        holding.set()
        assert gate.wait(WAIT_S)

    held = asyncio.ensure_future(store.db.write(hold))
    assert await asyncio.to_thread(holding.wait, WAIT_S)
    before = store.db.commits
    sends = [asyncio.ensure_future(store.enqueue(f"s{i % 20}", "+1", f"m{i}", f"k{i}",
                                                 max_depth=100, at=1.0)) for i in range(200)]
    await asyncio.sleep(0)  # let every send queue its write
    assert not any(s.done() for s in sends)
    gate.set()
    await held
    accepted = await asyncio.gather(*sends)
    assert store.db.commits == before + 2  # the held write's, then one for all 200
    assert sorted(a.message.sequence for a in accepted if a.message.session_id == "s0") == \
        list(range(1, 11))


async def test_one_failing_write_in_a_group_leaves_the_others(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    store = await reopen()
    stale = await store.new_fence("s1")
    await store.new_fence("s1")
    gate, holding = threading.Event(), threading.Event()

    def hold(txn: Txn) -> None:
        holding.set()
        assert gate.wait(WAIT_S)

    held = asyncio.ensure_future(store.db.write(hold))
    assert await asyncio.to_thread(holding.wait, WAIT_S)
    good = asyncio.ensure_future(store.enqueue("s2", "+1", "fine", "k1", max_depth=10, at=1.0))
    bad = asyncio.ensure_future(store.apply_outbox(
        "s1", OutboxBatch(messages=[NewMessage("+1", "stale", "k1")]), max_depth=10, at=1.0,
        fence=stale))
    await asyncio.sleep(0)
    gate.set()
    await held
    assert not (await good).duplicate
    with pytest.raises(NotOwner):
        await bad
    assert await store.outbox_depth("s1") == 0
    assert [m.body for m in await store.pending("s2", 10)] == ["fine"]


async def test_a_write_whose_caller_gave_up_is_still_committed(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    store = await reopen()
    gate, holding = threading.Event(), threading.Event()

    def hold(txn: Txn) -> None:
        holding.set()
        assert gate.wait(WAIT_S)

    held = asyncio.ensure_future(store.db.write(hold))
    assert await asyncio.to_thread(holding.wait, WAIT_S)
    send = asyncio.ensure_future(store.enqueue("s1", "+1", "m", "k1", max_depth=10, at=1.0))
    await asyncio.sleep(0)
    send.cancel()
    gate.set()
    await held
    with pytest.raises(asyncio.CancelledError):
        await send
    await store.db.write(lambda txn: None)  # writes commit in order: the send's is done
    found = await store.find_by_key("s1", "k1")  # queued all the same: a retry finds it
    assert found is not None and found.message.body == "m"
    assert await store.outbox_depth("s1") == 1


# -- retention and lost keys -------------------------------------------------------


async def test_acked_messages_are_forgotten_past_the_idempotency_ttl(
    reopen: Callable[..., Awaitable[SqliteStore]],
) -> None:
    """Kept for their key while young; swept with a later batch of acks once old."""
    store = await reopen(idempotency_ttl_s=100.0)
    news = [NewMessage("+1", f"m{i}", f"k{i}") for i in range(1000)]
    done = await store.apply_outbox("s1", OutboxBatch(messages=news), max_depth=2000, at=1.0)
    mids = [a.message.message_id for a in done.accepted if not isinstance(a, Exception)]
    await store.apply_outbox("s1", OutboxBatch(acks=mids[:999]), max_depth=2000, at=2.0)
    assert await store.find_by_key("s1", "k0") is not None  # young: still known
    await store.apply_outbox("s1", OutboxBatch(acks=mids[999:]), max_depth=2000, at=500.0)
    assert await store.find_by_key("s1", "k0") is None  # old: swept
    assert await store.result("s1", mids[0]) is None
    kept = await store.find_by_key("s1", "k999")  # acked at 500: young
    assert kept is not None and kept.result is not None and kept.result.acked_at == 500.0


async def test_credentials_sealed_with_a_lost_key_are_reported_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "broker.db"
    store = open_sqlite(path)
    await store.save_credentials("s1", {"token": "t"})
    await store.close()
    other = SqliteStore(path, cipher=CredentialCipher.from_key(bytes(32)))
    with caplog.at_level(logging.ERROR, logger="broker.store.sqlite"):
        await other.open()
    try:
        assert "1 sessions" in caplog.text and "must pair again" in caplog.text
        assert await other.has_credentials("s1")
        with pytest.raises(CredentialDecryptError):
            await other.load_credentials("s1")
    finally:
        await other.close()


async def test_sends_wait_for_the_disk_sync_acks_alone_do_not(
    reopen: Callable[..., Awaitable[SqliteStore]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await reopen()

    def synchronous(txn: Txn) -> int:
        return int(txn.conn.execute("PRAGMA synchronous").fetchone()[0])

    assert await store.db.write(synchronous) == 2  # FULL: the WAL is synced
    assert await store.db.write(synchronous, durable=False) == 1  # NORMAL
    # sharing a transaction with a durable write, a write is synced with it
    gate, holding = threading.Event(), threading.Event()

    def hold(txn: Txn) -> None:
        holding.set()
        assert gate.wait(WAIT_S)

    held = asyncio.ensure_future(store.db.write(hold, durable=False))
    assert await asyncio.to_thread(holding.wait, WAIT_S)
    probe = asyncio.ensure_future(store.db.write(synchronous, durable=False))
    send = asyncio.ensure_future(store.enqueue("s1", "+1", "m", "k1", max_depth=10, at=1.0))
    await asyncio.sleep(0)
    gate.set()
    await held
    assert await probe == 2
    mid = (await send).message.message_id
    # which outbox writes ask for the sync: those that accept messages
    asked: list[bool] = []
    write = store.db.write

    async def spy(fn: Callable[[Txn], object], *, durable: bool = True) -> object:
        asked.append(durable)
        return await write(fn, durable=durable)

    monkeypatch.setattr(store.db, "write", spy)
    await store.apply_outbox("s1", OutboxBatch(messages=[NewMessage("+1", "n", "k2")]),
                             max_depth=10, at=2.0)
    await mark_acked(store, "s1", mid, 3.0)
    await store.apply_outbox("s1", OutboxBatch(acks=[mid], messages=[NewMessage("+1", "o", "k3")]),
                             max_depth=10, at=4.0)
    assert asked == [True, False, True]
