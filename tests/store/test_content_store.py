"""A message's content (media, location, ...) in every store: kept with the message,
handed to delivery with it, readable as a sent message until its retention ends, and
left alone by the idempotency replay (issue 15)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from broker import content as contents
from broker.content import Content, Location, Media, MediaKind, Reaction
from broker.store.base import NewMessage, OutboxBatch, SessionRecord, Store
from broker.store.sqlite import MIGRATIONS, SCHEMA_VERSION
from tests.store.conftest import mark_acked, open_sqlite

IMAGE = contents.encode(Content(Media(MediaKind.IMAGE, os.urandom(300_000) + b"\x00\xff",
                                      "image/jpeg", "a caption"), reply_to="m-1"))
PLACE = contents.encode(Content(Location(52.52, 13.405, "Berlin")))


async def test_content_travels_with_the_message_to_delivery_and_back(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    batch = OutboxBatch(messages=[NewMessage("+1", "", "k-img", content=IMAGE),
                                  NewMessage("+1", "plain", "k-text"),
                                  NewMessage("+1", "", "k-loc", content=PLACE)], claim=True)
    result = await store.apply_outbox("s1", batch, max_depth=10, at=1.0)
    assert [m.content for m in result.claimed] == [IMAGE, None, PLACE]
    ids = [a.message.message_id for a in result.accepted]  # type: ignore[union-attr]
    # A new reader (say, after a restart) gets the same bytes.
    assert [m.content for m in await store.pending("s1", 10)] == [IMAGE, None, PLACE]
    for mid, payload in zip(ids, [IMAGE, None, PLACE], strict=True):
        sent = await store.sent_message("s1", mid)
        assert sent is not None and sent.content == payload
    await mark_acked(store, "s1", ids[0], 2.0)
    acked = await store.sent_message("s1", ids[0])
    assert acked is not None and acked.content == IMAGE, "kept for the sent-message retention"
    assert [m.content for m in await store.pending("s1", 10)] == [None, PLACE]


async def test_the_same_key_with_other_content_returns_the_first_message(store: Store) -> None:
    await store.create_session(SessionRecord("s1", "t1"))
    first = await store.enqueue("s1", "+1", "", "k", max_depth=10, at=1.0, content=IMAGE)
    other = contents.encode(Content(Reaction("m-2", "x")))
    again = await store.enqueue("s1", "+1", "", "k", max_depth=10, at=2.0, content=other)
    assert again.duplicate and again.message.message_id == first.message.message_id
    assert [m.content for m in await store.pending("s1", 10)] == [IMAGE]


async def test_a_schema_2_database_gains_the_content_column(tmp_path: Path) -> None:
    """A database written before content existed: its queued text survives the upgrade
    and new messages keep their content."""
    path = tmp_path / "broker.db"
    old = open_sqlite(path)
    await old.create_session(SessionRecord("s1", "t1"))
    await old.enqueue("s1", "+1", "from before", "k1", max_depth=10, at=1.0)
    await old.close()
    with sqlite3.connect(path) as conn:  # back to what schema 2 wrote
        for table, column in (("inbound", "media"), ("inbound", "content"),
                              ("messages", "content"), ("inbound", "origin"),
                              ("messages", "refused"), ("messages", "refused_code")):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 2")
        assert MIGRATIONS[4].strip() == "ALTER TABLE messages ADD COLUMN content BLOB;"
    store = open_sqlite(path)
    try:
        await store.enqueue("s1", "+1", "", "k2", max_depth=10, at=2.0, content=IMAGE)
        pending = await store.pending("s1", 10)
        assert [(m.body, m.content) for m in pending] == [("from before", None), ("", IMAGE)]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_schema_5_database_gains_inbound_content_and_media(tmp_path: Path) -> None:
    """Inbound messages stored before inbound content existed stay readable as text, and
    new ones keep their content and medium."""
    path = tmp_path / "broker.db"
    old = open_sqlite(path)
    await old.create_session(SessionRecord("s1", "t1"))
    assert await old.add_inbound("s1", "up-1", "+49", "from before", 1.0) is not None
    await old.close()
    with sqlite3.connect(path) as conn:  # back to what schema 5 wrote
        for column in ("media", "content"):
            conn.execute(f"ALTER TABLE inbound DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 5")
    store = open_sqlite(path)
    try:
        assert await store.add_inbound("s1", "up-2", "+49", "", 2.0, content=IMAGE,
                                       media=b"\x89PNG") is not None
        taken = await store.read_inbound("s1", "g", "c", 10, 0)
        assert [(d.record.body, d.record.content) for d in taken] == [
            ("from before", None), ("", IMAGE)]
        assert await store.inbound_media("s1", "up-2") == b"\x89PNG"
        assert await store.inbound_media("s1", "up-1") is None
    finally:
        await store.close()
