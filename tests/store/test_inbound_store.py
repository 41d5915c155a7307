"""The inbound part of the Store contract, on the memory, SQLite and Redis stores alike.

Consumer-group semantics (Redis Streams: XREADGROUP + XAUTOCLAIM; the memory
store mimics them): every group sees every message from the start of the
stream, the consumers of a group share them, an unacked delivery is claimed by
another reader once idle past the redelivery delay, an acked one never again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker.store.base import (
    NO_ORIGIN,
    UPDATES,
    InboundDelivery,
    InboundOrigin,
    NewEntry,
    SessionRecord,
    Store,
)
from tests.store.conftest import Backend

REDELIVER_S = 0.2
WAIT_S = 10.0
"""Upper bound of every wait that should end much sooner: a hang fails, never blocks."""
QUIET_S = 0.05
"""How long a read blocks when the test expects nothing (a short poll, not a threshold)."""


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """A store with a short redelivery delay, on the backend's server."""
    opened = await backend.fresh(inbound_redeliver_after_s=REDELIVER_S)
    await opened.create_session(SessionRecord("s1", "t1"))
    yield opened


async def _add(store: Store, *bodies: str, session_id: str = "s1") -> list[str]:
    ids = []
    for body in bodies:
        record = await store.add_inbound(session_id, f"up-{body}", "+49", body, 1000.0)
        assert record is not None
        ids.append(record.inbound_id)
    return ids


async def _read_until(
    store: Store, group: str, consumer: str, want: int, session_id: str = "s1"
) -> list[InboundDelivery]:
    """Read until `want` deliveries arrived (bounded): redelivery needs the delay to pass."""
    deadline = time.monotonic() + WAIT_S
    out: list[InboundDelivery] = []
    while len(out) < want:
        assert time.monotonic() < deadline, f"only {len(out)} of {want} deliveries arrived"
        out += await store.read_inbound(session_id, group, consumer, want - len(out), 0.1)
    return out


def _bodies(deliveries: list[InboundDelivery]) -> list[str]:
    return [d.record.body for d in deliveries]


async def test_add_is_deduplicated_by_upstream_id(store: Store) -> None:
    first = await store.add_inbound("s1", "up-1", "+49", "hello", 1000.5)
    assert first is not None
    assert (first.session_id, first.upstream_id, first.sender, first.body, first.received_at) == (
        "s1", "up-1", "+49", "hello", 1000.5)
    assert await store.add_inbound("s1", "up-1", "+49", "hello", 1001.0) is None
    second = await store.add_inbound("s1", "up-2", "+49", "again", 1002.0)
    assert second is not None and second.inbound_id != first.inbound_id
    got = await store.read_inbound("s1", "g", "c1", 10, QUIET_S)
    assert [(d.record, d.delivery_count) for d in got] == [(first, 1), (second, 1)]


async def test_the_origin_is_kept_on_first_delivery_and_redelivery(store: Store) -> None:
    origin = InboundOrigin(sender_lid="12345@lid", push_name="Ana \u00e9 \U0001f600",
                           chat="120363@g.us", sent_at=1700000000.0)
    added = await store.add_inbound("s1", "up-o", "49170@s.whatsapp.net", "hi", 1000.0,
                                    origin=origin)
    assert added is not None and added.origin == origin
    plain = await store.add_inbound("s1", "up-p", "+49", "plain", 1001.0)
    assert plain is not None and plain.origin == NO_ORIGIN
    first = await store.read_inbound("s1", "g", "c1", 10, QUIET_S)
    assert [d.record for d in first] == [added, plain]
    again = await _read_until(store, "g", "c2", 2)  # unacked: claimed once idle
    assert [(d.record, d.delivery_count) for d in again] == [(added, 2), (plain, 2)]


async def test_topics_are_separate_logs_with_their_own_groups(store: Store) -> None:
    await store.add_inbound("s1", "same-id", "+49", "a message", 1000.0)
    entries = [NewEntry("same-id", "m-1", "SERVER_ACK"), NewEntry("m-1:READ", "m-1", "READ"),
               NewEntry("same-id", "m-1", "dup in the batch")]
    added = await store.add_entries("s1", entries, 1001.0, topic=UPDATES)
    assert [r is not None for r in added] == [True, True, False]
    assert [r.body for r in added if r] == ["SERVER_ACK", "READ"]
    again = await store.add_entries("s1", entries[:1], 1002.0, topic=UPDATES)
    assert again == [None]  # de-duplicated across writes too
    inbound = await store.read_inbound("s1", "g", "c", 10, QUIET_S)
    updates = await store.read_inbound("s1", "g", "c", 10, QUIET_S, topic=UPDATES)
    assert _bodies(inbound) == ["a message"]
    assert _bodies(updates) == ["SERVER_ACK", "READ"]
    assert all(d.record.session_id == "s1" for d in updates)
    # acks settle per topic: the updates' acks leave the inbound message pending
    assert await store.ack_inbound("s1", "g", [d.record.inbound_id for d in updates],
                                   topic=UPDATES) == 2
    assert await store.ack_inbound("s1", "g", [inbound[0].record.inbound_id]) == 1
    found = await store.find_inbound("s1", ["same-id", "m-1:READ", "m-1:PLAYED"], topic=UPDATES)
    assert {k: v.body for k, v in found.items()} == {"same-id": "SERVER_ACK", "m-1:READ": "READ"}
    assert (await store.find_inbound("s1", ["same-id"]))["same-id"].body == "a message"
    await store.delete_session("s1")
    assert await store.find_inbound("s1", ["same-id", "m-1:READ"], topic=UPDATES) == {}
    assert await store.read_inbound("s1", "g2", "c", 10, QUIET_S, topic=UPDATES) == []


async def test_a_new_group_starts_at_the_beginning(store: Store) -> None:
    await _add(store, "a", "b")
    assert _bodies(await store.read_inbound("s1", "g", "c1", 10, QUIET_S)) == ["a", "b"]
    assert await store.read_inbound("s1", "g", "c1", 10, QUIET_S) == []
    # A group created later still sees all of it.
    assert _bodies(await store.read_inbound("s1", "late", "x", 10, QUIET_S)) == ["a", "b"]


async def test_count_limits_a_read(store: Store) -> None:
    await _add(store, "a", "b", "c")
    assert _bodies(await store.read_inbound("s1", "g", "c1", 2, QUIET_S)) == ["a", "b"]
    assert _bodies(await store.read_inbound("s1", "g", "c1", 2, QUIET_S)) == ["c"]


async def test_consumers_of_a_group_share_and_groups_each_get_all(store: Store) -> None:
    await _add(store, "a", "b", "c", "d")
    one = await store.read_inbound("s1", "g", "c1", 2, QUIET_S)
    two = await store.read_inbound("s1", "g", "c2", 10, QUIET_S)
    assert _bodies(one) + _bodies(two) == ["a", "b", "c", "d"]
    other = await store.read_inbound("s1", "other", "c1", 10, QUIET_S)
    assert _bodies(other) == ["a", "b", "c", "d"]


async def test_unacked_is_redelivered_to_another_consumer_acked_never(store: Store) -> None:
    ids = await _add(store, "a", "b")
    taken = await store.read_inbound("s1", "g", "dead", 10, QUIET_S)
    assert _bodies(taken) == ["a", "b"]
    assert await store.ack_inbound("s1", "g", [ids[0]]) == 1
    again = await _read_until(store, "g", "alive", 1)
    assert [(d.record.body, d.delivery_count) for d in again] == [("b", 2)]
    assert await store.ack_inbound("s1", "g", [ids[1]]) == 1
    # Both settled: nothing more, however long we wait past the delay.
    await asyncio.sleep(REDELIVER_S * 2)
    assert await store.read_inbound("s1", "g", "alive", 10, QUIET_S) == []
    assert await store.read_inbound("s1", "g", "dead", 10, QUIET_S) == []


async def test_ack_counts_only_pending(store: Store) -> None:
    ids = await _add(store, "a")
    assert await store.ack_inbound("s1", "g", ids) == 0  # never delivered to g
    await store.read_inbound("s1", "g", "c1", 10, QUIET_S)
    assert await store.ack_inbound("s1", "g", ids + ids) == 1
    assert await store.ack_inbound("s1", "g", ids) == 0
    assert await store.ack_inbound("s1", "nogroup", ids) == 0
    assert await store.ack_inbound("ghost", "g", ids) == 0


async def test_blocked_read_wakes_on_add(store: Store) -> None:
    reader = asyncio.create_task(_read_until(store, "g", "c1", 1))
    await asyncio.sleep(0.05)  # let it block (correctness does not depend on it)
    await _add(store, "late")
    assert _bodies(await asyncio.wait_for(reader, WAIT_S)) == ["late"]


async def test_cancelled_read_takes_nothing(store: Store) -> None:
    reader = asyncio.create_task(store.read_inbound("s1", "g", "gone", 10, WAIT_S))
    await asyncio.sleep(0.05)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await _add(store, "a")
    got = await _read_until(store, "g", "c2", 1)
    assert _bodies(got) == ["a"]


async def test_sessions_are_separate_and_delete_forgets(store: Store) -> None:
    await store.create_session(SessionRecord("s2", "t1"))
    await _add(store, "a")
    await _add(store, "b", session_id="s2")
    assert _bodies(await store.read_inbound("s2", "g", "c1", 10, QUIET_S)) == ["b"]
    await store.delete_session("s2")
    assert await store.read_inbound("s2", "g", "c1", 10, QUIET_S) == []
    await _add(store, "b", session_id="s2")  # same upstream id: stored anew
    assert _bodies(await store.read_inbound("s2", "g", "c1", 10, QUIET_S)) == ["b"]
    assert _bodies(await store.read_inbound("s1", "g", "c1", 10, QUIET_S)) == ["a"]


RETENTION_S = 1.0


@pytest.fixture
async def kept(backend: Backend) -> AsyncIterator[Store]:
    """A store that keeps inbound messages for RETENTION_S."""
    opened = await backend.fresh(inbound_redeliver_after_s=REDELIVER_S,
                                 inbound_retention_s=RETENTION_S)
    await opened.create_session(SessionRecord("s1", "t1"))
    yield opened


async def test_messages_past_the_retention_go_with_their_dedup_entries(kept: Store) -> None:
    assert await kept.add_inbound("s1", "up-old", "+49", "old", time.time()) is not None
    taken = await _read_until(kept, "g1", "c1", 1)  # delivered, never acked
    assert _bodies(taken) == ["old"]
    await asyncio.sleep(RETENTION_S * 1.5)  # the retention passes (a wait, not a bound)
    assert await kept.add_inbound("s1", "up-new", "+49", "new", time.time()) is not None
    # What arrives trims what is past the retention, acked or not:
    assert _bodies(await _read_until(kept, "g2", "c1", 1)) == ["new"]  # a new group
    assert await kept.read_inbound("s1", "g2", "c1", 10, QUIET_S) == []
    assert _bodies(await _read_until(kept, "g1", "c1", 1)) == ["new"]
    await asyncio.sleep(REDELIVER_S * 1.5)  # "old" would be due for redelivery by now
    assert _bodies(await kept.read_inbound("s1", "g1", "c2", 10, QUIET_S)) == ["new"]
    # ...and its de-dup entry went with it, while what is kept stays de-duplicated.
    assert await kept.add_inbound("s1", "up-new", "+49", "new", time.time()) is None
    assert await kept.add_inbound("s1", "up-old", "+49", "old", time.time()) is not None


async def test_without_a_retention_nothing_is_trimmed(store: Store) -> None:
    await _add(store, "a")
    await asyncio.sleep(RETENTION_S * 1.5)
    await _add(store, "b")
    assert _bodies(await _read_until(store, "g1", "c1", 2)) == ["a", "b"]
    assert await store.add_inbound("s1", "up-a", "+49", "a", time.time()) is None


async def test_the_broker_opens_its_store_with_the_configured_retention(
    backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from broker.backends import open_store
    from broker.config import Settings
    from broker.store.crypto import generate_key

    monkeypatch.setenv("BROKER_CREDENTIAL_KEYS", f"k1:{generate_key()}")
    url = {"memory": "memory://", "sqlite": f"sqlite://{backend.tmp / 'wired.db'}"}.get(
        backend.name, backend.server.url if backend.server else "")
    opened = open_store(Settings(store_url=url, inbound_retention_s=RETENTION_S,
                                 key_prefix="wired"))
    await opened.create_session(SessionRecord("s1", "t1"))
    try:
        assert await opened.add_inbound("s1", "up-a", "+49", "a", time.time()) is not None
        await asyncio.sleep(RETENTION_S * 1.5)
        assert await opened.add_inbound("s1", "up-b", "+49", "b", time.time()) is not None
        assert _bodies(await _read_until(opened, "g", "c", 1)) == ["b"]
    finally:
        await opened.close()


async def test_content_and_media_are_kept_with_the_entry(store: Store) -> None:
    await store.create_session(SessionRecord("s2", "t1"))
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    added = await store.add_inbound("s1", "up-img", "+49", "", 1000.0, content=b"\x12\x00c1",
                                    media=big)
    assert added is not None and added.content == b"\x12\x00c1"
    [other] = await store.add_entries("s2", [NewEntry("up-img", "+49", "", NO_ORIGIN, b"c2",
                                                      b"\x00theirs")], 1000.0, topic="inbound")
    assert other is not None
    await _add(store, "plain")
    # A re-sent entry is dropped with its bytes: the first ones stay.
    assert await store.add_inbound("s1", "up-img", "+49", "", 1001.0, content=b"x",
                                   media=b"other") is None
    taken = await _read_until(store, "g1", "c1", 2)
    assert [(d.record.upstream_id, d.record.content) for d in taken] == [
        ("up-img", b"\x12\x00c1"), ("up-plain", None)]
    found = await store.find_inbound("s1", ["up-img", "up-plain"])
    assert found["up-img"].content == b"\x12\x00c1" and found["up-plain"].content is None
    assert await store.inbound_media("s1", "up-img") == big
    assert await store.inbound_media("s2", "up-img") == b"\x00theirs"
    assert await store.inbound_media("s1", "up-plain") is None
    assert await store.inbound_media("s1", "up-never") is None
    await store.delete_session("s2")
    assert await store.inbound_media("s2", "up-img") is None
    assert await store.inbound_media("s1", "up-img") == big


async def test_media_past_the_retention_go_with_their_entries(kept: Store) -> None:
    assert await kept.add_inbound("s1", "up-old", "+49", "", time.time(), content=b"c",
                                  media=b"old bytes") is not None
    await asyncio.sleep(RETENTION_S * 1.5)  # the retention passes (a wait, not a bound)
    assert await kept.add_inbound("s1", "up-new", "+49", "", time.time(), content=b"c",
                                  media=b"new bytes") is not None
    assert await kept.inbound_media("s1", "up-old") is None
    assert await kept.inbound_media("s1", "up-new") == b"new bytes"


async def test_many_blocked_readers_at_once_each_get_their_message(store: Store) -> None:
    """More blocking reads side by side than redis-py's cluster client allows per
    node by default (100; past it, MaxConnectionsError): each reader waits, then
    gets the message added for its session. Made red once on the cluster with
    the client's default cap."""
    readers = 360  # > 100 per node on 3 primaries, whatever the slots
    sessions = [f"many{i}" for i in range(readers)]
    for sid in sessions:
        await store.create_session(SessionRecord(sid, "t1"))
    reads = [asyncio.create_task(store.read_inbound(sid, "g", "c", 1, WAIT_S))
             for sid in sessions]
    await asyncio.sleep(QUIET_S)  # most of them blocked by now (not required)
    for n, sid in enumerate(sessions):
        await store.add_inbound(sid, f"up-{n}", "+49", f"m{n}", 1000.0)
    got = await asyncio.wait_for(asyncio.gather(*reads), WAIT_S * 2)
    assert [[d.record.body for d in out] for out in got] == [[f"m{n}"] for n in range(readers)]
