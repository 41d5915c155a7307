"""The Store contract: the same behaviour from the memory store and from Redis.

The memory store is the reference; every test here runs against both, so the
runtime can switch backends without noticing.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import OutboxFull
from broker.lifecycle.states import State
from broker.store.base import (
    Accepted,
    NewMessage,
    OutboxBatch,
    Refusal,
    SessionRecord,
    StatusEvent,
    Store,
    event_order,
)
from broker.store.redis import RedisStore
from broker.store.redis.connect import CLUSTER_SHARDS
from broker.store.redis.keys import shard_of
from tests.store.conftest import Backend, mark_acked

WAIT_S = 30.0
"""Upper bound of every wait that should end much sooner: a hang fails, never blocks."""


def _event(session_id: str, sequence: int, state: State = State.OPEN) -> StatusEvent:
    return StatusEvent(
        session_id=session_id, tenant="t1", sequence=sequence, state=state,
        previous=State.CONNECTING, reason=f"step {sequence}", code=sequence, retry_in_s=1.5,
        qr="qr-data" if sequence % 2 else None, attempt=sequence, at=1000.0 + sequence,
    )


async def _let_waiter_start() -> None:
    """Give a just-created waiter task a chance to block (correctness never depends on it)."""
    for _ in range(20):
        await asyncio.sleep(0.005)


# sessions
async def test_create_is_insert_if_absent(store: Store) -> None:
    record = SessionRecord("s1", "t1", enabled=True, created_at=123.5)
    stored, created = await store.create_session(record)
    assert (stored, created) == (record, True)
    again, created = await store.create_session(SessionRecord("s1", "other", created_at=9.0))
    assert (again, created) == (record, False)
    assert await store.get_session("s1") == record
    assert await store.get_session("nope") is None


async def test_list_by_tenant_set_enabled_and_delete(store: Store) -> None:
    for sid, tenant in [("b", "t1"), ("a", "t1"), ("c", "t2")]:
        await store.create_session(SessionRecord(sid, tenant, created_at=1.0))
    assert [r.session_id for r in await store.list_sessions()] == ["a", "b", "c"]
    assert [r.session_id for r in await store.list_sessions("t1")] == ["a", "b"]
    assert [r.session_id for r in await store.list_sessions("t2")] == ["c"]
    assert await store.list_sessions("none") == []

    await store.set_enabled("a", False)
    assert (await store.get_session("a")) == SessionRecord("a", "t1", False, 1.0)
    await store.set_enabled("a", True)
    assert (await store.get_session("a")) == SessionRecord("a", "t1", True, 1.0)
    await store.set_enabled("ghost", False)
    assert await store.get_session("ghost") is None

    await store.save_credentials("a", {"token": "x"})
    await store.enqueue("a", "+1", "hi", "k1", max_depth=10, at=1.0)
    await store.append_event(_event("a", 1))
    await store.delete_session("a")
    assert await store.get_session("a") is None
    assert [r.session_id for r in await store.list_sessions("t1")] == ["b"]
    assert await store.load_credentials("a") is None
    assert await store.outbox_depth("a") == 0
    assert await store.pending("a", 10) == []
    assert await store.find_by_key("a", "k1") is None
    assert await store.last_event("a") is None
    await store.delete_session("a")  # deleting twice is harmless


# credentials
async def test_credentials_roundtrip(store: Store) -> None:
    assert await store.load_credentials("s1") is None
    creds = {"token": "tok-é-✓", "device": 7, "nested": {"a": [1, 2]}, "flag": True}
    await store.save_credentials("s1", creds)
    assert await store.load_credentials("s1") == creds
    await store.save_credentials("s1", {"token": "new"})
    assert await store.load_credentials("s1") == {"token": "new"}
    assert await store.load_credentials("s2") is None
    await store.clear_credentials("s1")
    assert await store.load_credentials("s1") is None


# outbox
async def test_enqueue_is_idempotent_per_key(store: Store) -> None:
    body = 'hello "wörld" ✓ \\ / \n {}'
    first = await store.enqueue("s1", "+1", body, "key-1", max_depth=10, at=5.25)
    assert not first.duplicate and first.result is None
    message = first.message
    assert (message.session_id, message.to, message.body, message.idempotency_key,
            message.sequence, message.accepted_at) == ("s1", "+1", body, "key-1", 1, 5.25)

    again = await store.enqueue("s1", "+2", "other body", "key-1", max_depth=10, at=9.0)
    assert again.duplicate and again.message == message and again.result is None
    assert await store.pending("s1", 10) == [message]
    assert await store.outbox_depth("s1") == 1
    assert await store.find_by_key("s1", "key-1") == again
    assert await store.find_by_key("s1", "key-2") is None
    assert await store.find_by_key("s2", "key-1") is None

    second = await store.enqueue("s1", "+1", "next", "key-2", max_depth=10, at=6.0)
    assert second.message.sequence == 2
    assert second.message.message_id != message.message_id
    other = await store.enqueue("s2", "+1", "hello", "key-1", max_depth=10, at=6.0)
    assert not other.duplicate and other.message.sequence == 1


async def test_pending_is_fifo_oldest_unacked(store: Store) -> None:
    ids = [
        (await store.enqueue("s1", "+1", f"body {i}", f"k{i}", max_depth=100, at=float(i)))
        .message.message_id
        for i in range(6)
    ]
    assert [m.message_id for m in await store.pending("s1", 100)] == ids
    assert [m.message_id for m in await store.pending("s1", 2)] == ids[:2]
    assert [m.sequence for m in await store.pending("s1", 100)] == [1, 2, 3, 4, 5, 6]
    await mark_acked(store, "s1", ids[0], 10.0)
    await mark_acked(store, "s1", ids[3], 11.0)
    assert [m.message_id for m in await store.pending("s1", 100)] == [
        ids[1], ids[2], ids[4], ids[5]
    ]
    assert [m.body for m in await store.pending("s1", 2)] == ["body 1", "body 2"]
    assert await store.pending("s1", 0) == []
    assert await store.pending("empty", 10) == []


async def test_pending_after_a_sequence_skips_what_the_reader_holds(store: Store) -> None:
    ids = [
        (await store.enqueue("s1", "+1", f"body {i}", f"k{i}", max_depth=100, at=float(i)))
        .message.message_id
        for i in range(6)
    ]
    # the window stays the 4 oldest unacked; of those, only the ones after seq 2
    assert [m.message_id for m in await store.pending("s1", 4, 2)] == ids[2:4]
    assert [m.message_id for m in await store.pending("s1", 100, 5)] == ids[5:]
    assert await store.pending("s1", 100, 6) == []
    await store.apply_outbox("s1", OutboxBatch(acks=ids[:2]), max_depth=10, at=7.0)
    assert [m.message_id for m in await store.pending("s1", 4, 2)] == ids[2:6]
    assert [m.message_id for m in await store.pending("s1", 2, 3)] == ids[3:4]


async def test_a_batch_of_acks_keeps_first_results(store: Store) -> None:
    mids = [
        (await store.enqueue("s1", "+1", f"m{i}", f"k{i}", max_depth=10, at=1.0))
        .message.message_id
        for i in range(4)
    ]
    first = await mark_acked(store, "s1", mids[1], 2.0)
    batch = OutboxBatch(acks=[mids[0], mids[1], mids[3], mids[0]])
    results = (await store.apply_outbox("s1", batch, max_depth=10, at=5.0)).acked
    assert [r.message_id for r in results] == [mids[0], mids[1], mids[3], mids[0]]
    assert [r.acked_at for r in results] == [5.0, first.acked_at, 5.0, 5.0]
    assert [m.message_id for m in await store.pending("s1", 10)] == [mids[2]]
    assert await store.result("s1", mids[3]) == results[2]
    empty = await store.apply_outbox("s1", OutboxBatch(), max_depth=10, at=6.0)
    assert (empty.acked, empty.accepted, empty.claimed) == ([], [], [])
    # acked keys answer as duplicates with their result
    dup = await store.enqueue("s1", "+1", "m0", "k0", max_depth=10, at=7.0)
    assert dup.duplicate and dup.result == results[0]


async def test_acks_free_room_for_new_messages_in_the_same_batch(store: Store) -> None:
    a = await store.enqueue("s1", "+1", "a", "ka", max_depth=1, at=1.0)
    batch = OutboxBatch(acks=[a.message.message_id], messages=[NewMessage("+1", "b", "kb")])
    done = await store.apply_outbox("s1", batch, max_depth=1, at=2.0)
    assert done.acked[0].message_id == a.message.message_id
    [b] = done.accepted
    assert isinstance(b, Accepted) and not b.duplicate
    assert [m.body for m in await store.pending("s1", 10)] == ["b"]


async def test_claimed_messages_are_read_for_the_caller_in_order(store: Store) -> None:
    old = await store.enqueue("s1", "+1", "old", "k0", max_depth=10, at=1.0)
    assert [m.body for m in await store.pending("s1", 10)] == ["old"]  # read by the owner
    batch = OutboxBatch(messages=[NewMessage("+1", "a", "k1"), NewMessage("+1", "b", "k2"),
                                  NewMessage("+1", "dup", "k0")], claim=True)
    done = await store.apply_outbox("s1", batch, max_depth=10, at=2.0)
    assert [m.body for m in done.claimed] == ["a", "b"] and not done.unread
    assert done.claimed[0] == done.accepted[0].message
    assert done.accepted[2] == Accepted(old.message, True)
    # claimed counts as read: the owner's next read after "b" finds nothing new
    assert await store.pending("s1", 10, done.claimed[-1].sequence) == []
    assert [m.body for m in await store.pending("s1", 10)] == ["old", "a", "b"]
    # without claim nothing is read; a claim then hands out the oldest unread first
    await store.enqueue("s1", "+1", "c", "k3", max_depth=10, at=3.0)
    batch = OutboxBatch(messages=[NewMessage("+1", "d", "k4")], claim=True)
    done = await store.apply_outbox("s1", batch, max_depth=10, at=4.0)
    assert [m.body for m in done.claimed] == ["c"] and done.unread
    assert [m.body for m in await store.pending("s1", 10, done.claimed[-1].sequence)] == ["d"]


async def test_a_batch_numbers_its_new_messages_in_order_and_the_next_goes_on(
        store: Store) -> None:
    first = await store.enqueue("s1", "+1", "first", "k0", max_depth=4, at=1.0)
    assert first.message.sequence == 1
    batch = OutboxBatch(messages=[
        NewMessage("+1", "a", "k1"), NewMessage("+1", "again", "k0"),
        NewMessage("+1", "b", "kb-unkeyed", retryable=False), NewMessage("+1", "c", "k3"),
        NewMessage("+1", "over", "k4")])  # the 5th: the outbox holds 4 at most
    done = await store.apply_outbox("s1", batch, max_depth=4, at=2.0)
    kinds = [type(a).__name__ if not isinstance(a, Accepted) else a.duplicate
             for a in done.accepted]
    assert kinds == [False, True, False, False, "OutboxFull"]
    numbered = [a.message.sequence for a in done.accepted
                if isinstance(a, Accepted) and not a.duplicate]
    assert numbered == [2, 3, 4]
    assert [m.sequence for m in await store.pending("s1", 10)] == [1, 2, 3, 4]
    await mark_acked(store, "s1", first.message.message_id, 3.0)
    after = await store.enqueue("s1", "+1", "d", "k5", max_depth=4, at=4.0)
    assert after.message.sequence == 5


async def test_outbox_full_at_max_depth(store: Store) -> None:
    a = await store.enqueue("s1", "+1", "a", "ka", max_depth=2, at=1.0)
    await store.enqueue("s1", "+1", "b", "kb", max_depth=2, at=1.0)
    with pytest.raises(OutboxFull) as caught:
        await store.enqueue("s1", "+1", "c", "kc", max_depth=2, at=1.0)
    assert caught.value.reason == "OUTBOX_FULL"
    assert caught.value.metadata["session_id"] == "s1"
    assert await store.outbox_depth("s1") == 2
    assert await store.find_by_key("s1", "kc") is None
    # a retry of an accepted message is answered even when the outbox is full
    assert (await store.enqueue("s1", "+1", "a", "ka", max_depth=2, at=1.0)).duplicate
    await mark_acked(store, "s1", a.message.message_id, 2.0)
    c = await store.enqueue("s1", "+1", "c", "kc", max_depth=2, at=1.0)
    assert not c.duplicate and c.message.sequence == 3


async def test_mark_acked_records_result_and_removes(store: Store) -> None:
    accepted = await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
    mid = accepted.message.message_id
    assert await store.result("s1", mid) is None
    result = await mark_acked(store, "s1", mid, 2.5)
    assert (result.message_id, result.acked_at) == (mid, 2.5)
    assert await store.pending("s1", 10) == []
    assert await store.outbox_depth("s1") == 0
    assert await store.result("s1", mid) == result
    assert await mark_acked(store, "s1", mid, 9.0) == result  # a repeated ack keeps the first
    dup = await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=3.0)
    assert dup.duplicate and dup.message == accepted.message and dup.result == result
    assert await store.find_by_key("s1", "k1") == dup
    assert await store.outbox_depth("s1") == 0


async def test_a_refusal_settles_its_message_with_the_reason(backend: Backend) -> None:
    store = await backend.open()
    other = await backend.open()
    mids = [(await store.enqueue("s1", "+1", f"m{i}", f"k{i}", max_depth=10, at=1.0))
            .message.message_id for i in range(3)]
    waiter = asyncio.create_task(other.wait_result("s1", mids[1], WAIT_S))
    await _let_waiter_start()
    batch = OutboxBatch(acks=[mids[0]], refusals=[Refusal(mids[1], 463, "no privacy token")])
    done = await store.apply_outbox("s1", batch, max_depth=10, at=2.0)
    assert [(r.message_id, r.ok) for r in done.acked] == [(mids[0], True), (mids[1], False)]
    refused = done.acked[1]
    assert (refused.acked_at, refused.refused_code, refused.refused) == (
        2.0, 463, "no privacy token")
    # settled: out of the outbox, never read again, told to every waiter and view
    assert [m.message_id for m in await store.pending("s1", 10)] == [mids[2]]
    assert await store.outbox_depth("s1") == 1
    assert await asyncio.wait_for(waiter, WAIT_S) == refused
    assert await other.result("s1", mids[1]) == refused
    # the first answer stays: a late ack does not turn a refusal into a success
    late = await store.apply_outbox("s1", OutboxBatch(acks=[mids[1]]), max_depth=10, at=3.0)
    assert late.acked == [refused]
    # a retry under the key answers the refusal; so does the key lookup
    dup = await store.enqueue("s1", "+1", "m1", "k1", max_depth=10, at=4.0)
    assert dup.duplicate and dup.result == refused
    assert (await other.find_by_key("s1", "k1")) == dup
    # an empty reason still reads as a refusal
    empty = Refusal(mids[2], 0, "")
    [blank] = (await store.apply_outbox("s1", OutboxBatch(refusals=[empty]), max_depth=10,
                                        at=5.0)).acked
    assert not blank.ok and await store.result("s1", mids[2]) == blank


async def test_wait_result_wakes_a_waiter_in_this_and_another_view(backend: Backend) -> None:
    acker = await backend.open()
    other = await backend.open()
    accepted = await acker.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
    mid = accepted.message.message_id
    here = asyncio.create_task(acker.wait_result("s1", mid, WAIT_S))
    there = asyncio.create_task(other.wait_result("s1", mid, WAIT_S))
    await _let_waiter_start()
    assert not here.done() and not there.done()
    result = await mark_acked(acker, "s1", mid, 4.0)
    assert await asyncio.wait_for(here, WAIT_S) == result
    assert await asyncio.wait_for(there, WAIT_S) == result
    # once stored, a wait returns at once, even with no time left
    assert await other.wait_result("s1", mid, 0) == result


async def test_waiters_for_other_messages_keep_waiting(backend: Backend) -> None:
    store = await backend.open()
    other = await backend.open()
    m1 = (await store.enqueue("s1", "+1", "a", "k1", max_depth=10, at=1.0)).message.message_id
    m2 = (await store.enqueue("s1", "+1", "b", "k2", max_depth=10, at=1.0)).message.message_id
    w1 = asyncio.create_task(other.wait_result("s1", m1, WAIT_S))
    w2 = asyncio.create_task(other.wait_result("s1", m2, WAIT_S))
    await _let_waiter_start()
    await mark_acked(store, "s1", m2, 2.0)
    assert (await asyncio.wait_for(w2, WAIT_S)) is not None
    assert not w1.done()
    await mark_acked(store, "s1", m1, 3.0)
    assert (await asyncio.wait_for(w1, WAIT_S)) is not None


async def test_wait_result_times_out_with_none(store: Store) -> None:
    accepted = await store.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
    mid = accepted.message.message_id
    assert await store.wait_result("s1", mid, 0.05) is None
    assert await store.wait_result("s1", mid, 0) is None
    assert await store.wait_result("s1", "m-unknown", 0.05) is None


async def test_wait_outbox_wakes_on_enqueue_from_another_view(backend: Backend) -> None:
    owner = await backend.open()
    sender = await backend.open()
    await owner.wait_outbox("s1", 0.02)  # nothing queued: returns after the timeout
    waiter = asyncio.create_task(owner.wait_outbox("s1", WAIT_S))
    await _let_waiter_start()
    await sender.enqueue("s1", "+1", "hi", "k1", max_depth=10, at=1.0)
    await asyncio.wait_for(waiter, WAIT_S)
    assert [m.body for m in await owner.pending("s1", 10)] == ["hi"]


# events
def _same_shard_as(session_id: str) -> str:
    """Another session whose events share `session_id`'s shard of a sharded (Redis
    Cluster) log: ids are strictly ordered and unique within a shard only (each
    shard's are its own primary's stream ids; across shards the README's
    "Order across shards" applies), so exact replay is a per-shard contract."""
    return next(other for n in range(2, 1000) for other in [f"s{n}"]
                if shard_of(other, CLUSTER_SHARDS) == shard_of(session_id, CLUSTER_SHARDS))


async def test_events_replay_exactly_after_a_cursor(store: Store) -> None:
    appended = []
    s2 = _same_shard_as("s1")
    for i in range(1, 7):
        appended.append(await store.append_event(_event("s1" if i % 2 else s2, i)))
    ids = [e.event_id for e in appended]
    assert all(ids), "append_event assigns the id"
    assert [event_order(i) for i in ids] == sorted(event_order(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert appended[0] == _event("s1", 1).with_id(ids[0])

    page = await store.events_after(ids[1], 100)
    assert not page.gap and page.events == appended[2:]
    assert (await store.events_after(ids[1], 2)).events == appended[2:4]
    assert (await store.events_after(ids[-1], 100)).events == []
    everything = await store.events_after("0-0", 100)
    assert not everything.gap and everything.events == appended

    assert await store.last_event("s1") == appended[4]
    assert await store.last_event(s2) == appended[5]
    assert await store.last_event("s-none") is None


@pytest.mark.parametrize("cursor", ["garbage", "", "-1-0", "x-1"])
async def test_malformed_cursor_is_a_gap(store: Store, cursor: str) -> None:
    await store.append_event(_event("s1", 1))
    assert (await store.events_after(cursor, 10)).gap


async def test_gap_once_the_log_trimmed_past_the_cursor(backend: Backend) -> None:
    store = await backend.open(event_log_size=10)
    if isinstance(store, RedisStore):
        # MAXLEN ~ trims whole stream nodes only; small nodes make it trim at this size
        await store.client.config_set("stream-node-max-entries", 4)
    appended = [await store.append_event(_event("s1", i)) for i in range(1, 201)]
    assert (await store.events_after(appended[0].event_id, 1000)).gap
    assert (await store.events_after("0-0", 1000)).gap
    page = await store.events_after(appended[-4].event_id, 1000)
    assert not page.gap and page.events == appended[-3:]
    assert await store.last_event("s1") == appended[-1]
