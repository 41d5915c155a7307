"""What the stores keep does not grow without bound: no idempotency record for a
Send without a key, no consumer left behind by a former owner or an ended Receive.

Counted in raw Redis (SCAN, XINFO CONSUMERS); the memory and SQLite stores keep
no per-key records or consumer registry, so only the behaviour they share is
checked there (the message stays readable after its ack).
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.config import Settings
from broker.runtime.inbound import InboundService
from broker.store.base import (
    INBOUND,
    UPDATES,
    NewEntry,
    NewMessage,
    OutboxBatch,
    SessionRecord,
    Store,
)
from broker.store.memory import MemoryStore
from broker.store.redis import RedisKeys, RedisStore
from broker.store.redis.outbox import OUTBOX_GROUP
from tests.helpers import eventually_async
from tests.store.conftest import Backend, open_redis

SID = "bound1"
KEYS = RedisKeys()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def session_keys(store: RedisStore, session_id: str) -> set[str]:
    """Every key of the session, by SCAN (on a cluster, over every primary)."""
    return {_text(k) async for k in store.client.scan_iter(match=KEYS.session_pattern(session_id))}


async def consumers(store: RedisStore, key: str, group: str) -> dict[str, int]:
    """Consumer name -> pending count (XINFO CONSUMERS)."""
    rows: Any = await store.client.xinfo_consumers(key, group)
    return {_text(r["name"]): int(r["pending"]) for r in rows}


def redis_only(store: Store) -> RedisStore:
    if not isinstance(store, RedisStore):
        pytest.skip("only Redis keeps a record per idempotency key and a consumer registry")
    return store


async def _send_and_ack(store: Store, key: str, retryable: bool, body: str) -> str:
    accepted = (await store.apply_outbox(
        SID, OutboxBatch(messages=[NewMessage("+1", body, key, retryable)], claim=True),
        max_depth=100, at=1.0)).accepted[0]
    mid: str = accepted.message.message_id  # type: ignore[union-attr]
    await store.apply_outbox(SID, OutboxBatch(acks=[mid]), max_depth=100, at=2.0)
    return mid


async def test_a_send_without_a_key_is_readable_after_its_ack(store: Store) -> None:
    await store.create_session(SessionRecord(SID, "t"))
    mid = await _send_and_ack(store, "auto-made-up", False, "no key")
    sent = await store.sent_message(SID, mid)
    assert sent is not None and sent.body == "no key"
    assert (await store.result(SID, mid)) is not None


async def test_a_send_without_a_key_keeps_no_idempotency_record(store: Store) -> None:
    redis = redis_only(store)
    await store.create_session(SessionRecord(SID, "t"))
    await _send_and_ack(store, "first", True, "creates the outbox")
    base = await session_keys(redis, SID)
    unkeyed = await _send_and_ack(store, "auto-made-up", False, "no key")
    after_unkeyed = await session_keys(redis, SID) - base
    assert after_unkeyed == {KEYS.result(SID, unkeyed), KEYS.sent(SID, unkeyed)}
    keyed = await _send_and_ack(store, "client-key", True, "key")
    assert await session_keys(redis, SID) - base - after_unkeyed == {
        KEYS.result(SID, keyed), KEYS.result_key(SID, keyed), KEYS.idem(SID, "client-key")}
    for key in (*after_unkeyed, KEYS.idem(SID, "client-key")):
        assert await redis.client.pttl(key) > 0, key  # each expires with the retention


async def test_former_owners_consumers_are_deleted_on_claim(backend: Backend) -> None:
    if backend.server is None:
        pytest.skip("only Redis keeps a consumer registry")
    owners = [open_redis(backend.server, consumer=f"start-{n}") for n in range(3)]
    try:
        first, second, third = owners
        await first.create_session(SessionRecord(SID, "t"))
        for n in range(2):
            await first.enqueue(SID, "+1", f"m{n}", f"k{n}", max_depth=10, at=1.0)
        [m0, _] = await first.pending(SID, 10)  # start-0 now holds both, unacked
        await first.apply_outbox(SID, OutboxBatch(acks=[m0.message_id]), max_depth=10, at=2.0)
        key = KEYS.outbox(SID)
        # A restart under a new name: start-0's unacked entry moves, start-0 goes.
        assert await second.claim_outbox(SID) == 1
        assert await consumers(second, key, OUTBOX_GROUP) == {"start-1": 1}
        [m1] = await second.pending(SID, 10)
        await second.apply_outbox(SID, OutboxBatch(acks=[m1.message_id]), max_depth=10, at=3.0)
        # start-1 holds nothing: the next owner deletes it all the same (start-2
        # itself appears with its first read).
        assert await third.claim_outbox(SID) == 0
        assert await consumers(third, key, OUTBOX_GROUP) == {}
    finally:
        for owner in owners:
            await owner.close()


async def test_a_receive_calls_consumer_is_deleted_when_it_ends(store: Store) -> None:
    redis = redis_only(store)
    await store.create_session(SessionRecord(SID, "t"))
    service = InboundService(store, Settings(inbound_redeliver_after_s=3600))
    key = KEYS.inbound(SID)
    for n in range(2):
        await store.add_inbound(SID, f"u{n}", "+1", f"in{n}", at=1.0)

    async def one_call(ack: bool) -> str:
        stream = service.receive([SID], group="workers", max_unacked=1)
        delivery = await anext(stream)
        if ack:
            await service.ack(SID, "workers", [delivery.record.inbound_id])
        await stream.aclose()
        return delivery.record.inbound_id

    await one_call(ack=True)
    assert await consumers(redis, key, "workers") == {}
    await one_call(ack=False)  # ends holding a delivery: kept, so it can be claimed
    assert list((await consumers(redis, key, "workers")).values()) == [1]


async def test_consumers_left_holding_deliveries_go_once_claimed_empty(backend: Backend) -> None:
    if backend.server is None:
        pytest.skip("only Redis keeps a consumer registry")
    store = await backend.fresh(inbound_redeliver_after_s=0.05)
    assert isinstance(store, RedisStore)
    await store.create_session(SessionRecord(SID, "t"))
    await store.add_inbound(SID, "u0", "+1", "in", at=1.0)
    [taken] = await store.read_inbound(SID, "g", "gone", 1, 0)
    key = store.keys.inbound(SID)
    assert await consumers(store, key, "g") == {"gone": 1}
    await store.release_inbound_consumer(SID, "g", "gone")  # still holds one: kept
    assert await consumers(store, key, "g") == {"gone": 1}

    async def claimed() -> bool:
        out = await store.read_inbound(SID, "g", "next", 1, 0)
        return [d.record.inbound_id for d in out] == [taken.record.inbound_id]

    await eventually_async(claimed, 10, "the idle delivery to be claimed by another consumer")
    assert await consumers(store, key, "g") == {"next": 1}


# -- the memory store: a count bound besides the retention -----------------------------


def _entries(n: int, start: int = 0) -> list[NewEntry]:
    return [NewEntry(f"up-{i}", "+49", f"body {i}") for i in range(start, start + n)]


async def _bodies(store: MemoryStore, group: str, topic: str = INBOUND) -> list[str]:
    got = await store.read_inbound(SID, group, "c", 1000, 0.0, topic=topic)
    return [d.record.body for d in got]


@pytest.mark.parametrize("topic", [INBOUND, UPDATES])
async def test_the_memory_store_keeps_only_the_newest_entries_nobody_waits_for(
    topic: str,
) -> None:
    """Every sent message adds status updates that no one may ever read: without a
    count bound they piled up for the whole retention (a week), about 1 KB each."""
    store = MemoryStore(entries_kept=3)
    await store.add_entries(SID, _entries(10), 1.0, topic=topic)
    assert await _bodies(store, "late", topic) == ["body 7", "body 8", "body 9"]
    # the trimmed ones' de-duplication entries went with them, the kept ones stay
    added = await store.add_entries(SID, _entries(1, start=0) + _entries(1, start=9), 2.0,
                                    topic=topic)
    assert [r is not None for r in added] == [True, False]


async def test_the_memory_store_never_trims_what_a_group_has_still_to_read_or_ack() -> None:
    store = MemoryStore(entries_kept=3)
    assert await _bodies(store, "g") == []  # the group exists, before anything arrived
    await store.add_entries(SID, _entries(10), 1.0, topic=INBOUND)  # unread: all kept
    got = await store.read_inbound(SID, "g", "c", 1000, 0.0)
    assert len(got) == 10
    await store.add_entries(SID, _entries(1, start=10), 1.0, topic=INBOUND)  # pending: kept
    await store.ack_inbound(SID, "g", [d.record.inbound_id for d in got[:5]])
    await store.add_entries(SID, _entries(1, start=11), 1.0, topic=INBOUND)
    # 0-4 acked and past the newest 3: gone; 5-9 unacked and 10-11 unread: kept
    assert await _bodies(store, "new") == [f"body {i}" for i in range(5, 12)]
    assert await _bodies(store, "g") == ["body 10", "body 11"]  # the group's place holds
