"""The fencing contract, on every backend: each owner write carries the owner's
token, and the store refuses any write whose token is not the current one.

Expiry alone never makes ownership exclusive; refused stale writes do
(docs/reliability.md). Every owner write is listed here, so a new one that forgets its
fence has no test to pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from broker.errors import NotOwner
from broker.lifecycle.states import State
from broker.store.base import LiveState, NewMessage, OutboxBatch, SessionRecord, StatusEvent, Store
from tests.store.conftest import mark_acked

SID = "s1"
Write = Callable[[Store, int], Awaitable[object]]


def _event(sequence: int, state: State = State.OPEN) -> StatusEvent:
    return StatusEvent(session_id=SID, tenant="t1", sequence=sequence, state=state,
                       previous=State.CONNECTING, reason="r", at=1000.0 + sequence)


async def _apply(store: Store, fence: int) -> object:
    batch = OutboxBatch(messages=[NewMessage("+1", "b", f"k{fence}")], claim=True)
    return await store.apply_outbox(SID, batch, max_depth=100, at=1.0, fence=fence)


OWNER_WRITES: dict[str, Write] = {
    "apply_outbox": _apply,
    "mark_acked": lambda s, f: mark_acked(s, SID, "m-none", 2.0, fence=f),
    "claim_outbox": lambda s, f: s.claim_outbox(SID, fence=f),
    "pending": lambda s, f: s.pending(SID, 10, fence=f),
    "append_event": lambda s, f: s.append_event(_event(f), fence=f),
    "report_live": lambda s, f: s.report_live(
        SID, LiveState(State.OPEN, "me", 1.0, 2.0), 30.0, fence=f),
    "add_inbound": lambda s, f: s.add_inbound(SID, f"u{f}", "+2", "hi", 3.0, fence=f),
    "save_credentials": lambda s, f: s.save_credentials(SID, {"token": f"t{f}"}, fence=f),
    "clear_credentials": lambda s, f: s.clear_credentials(SID, fence=f),
    "kv_set": lambda s, f: s.kv_set(SID, {"creds": f"c{f}".encode(), "gone": None}, fence=f),
    "kv_clear": lambda s, f: s.kv_clear(SID, fence=f),
}


@pytest.mark.parametrize("write", sorted(OWNER_WRITES))
async def test_a_stale_token_is_refused_and_the_current_one_accepted(
    store: Store, write: str
) -> None:
    await store.create_session(SessionRecord(SID, "t1"))
    old = await store.new_fence(SID)
    await OWNER_WRITES[write](store, old)  # the owner of the day writes
    new = await store.new_fence(SID)
    assert new > old
    with pytest.raises(NotOwner):
        await OWNER_WRITES[write](store, old)
    await OWNER_WRITES[write](store, new)


async def test_a_refused_write_changes_nothing(store: Store) -> None:
    await store.create_session(SessionRecord(SID, "t1"))
    old = await store.new_fence(SID)
    await store.append_event(_event(1), fence=old)
    await store.save_credentials(SID, {"token": "a"}, fence=old)
    new = await store.new_fence(SID)
    await store.append_event(_event(2), fence=new)
    # The former owner's late CONFLICT must not replace the real owner's state.
    with pytest.raises(NotOwner):
        await store.append_event(_event(3, State.CONFLICT), fence=old)
    with pytest.raises(NotOwner):
        await store.clear_credentials(SID, fence=old)
    with pytest.raises(NotOwner):
        await _apply(store, old)
    await store.kv_set(SID, {"creds": b"mine"}, fence=new)
    with pytest.raises(NotOwner):
        await store.kv_set(SID, {"creds": b"stale", "pre-key:1": b"k"}, fence=old)
    with pytest.raises(NotOwner):
        await store.kv_clear(SID, fence=old)
    assert await store.kv_get(SID, ["creds", "pre-key:1"]) == {"creds": b"mine"}
    last = await store.last_event(SID)
    assert last is not None and (last.sequence, last.state) == (2, State.OPEN)
    assert await store.load_credentials(SID) == {"token": "a"}
    assert await store.outbox_depth(SID) == 0
    page = await store.events_after("0-0", 100)
    assert [e.sequence for e in page.events if e.session_id == SID] == [1, 2]


async def test_unfenced_writes_are_not_owner_writes(store: Store) -> None:
    """Any instance accepts a Send (and an admin wipes credentials) without a token."""
    await store.create_session(SessionRecord(SID, "t1"))
    await store.new_fence(SID)
    accepted = await store.enqueue(SID, "+1", "b", "k1", max_depth=10, at=1.0)
    assert not accepted.duplicate
    await store.clear_credentials(SID)


async def test_tokens_keep_growing_across_delete_and_recreate(store: Store) -> None:
    await store.create_session(SessionRecord(SID, "t1"))
    old = await store.new_fence(SID)
    await store.enqueue(SID, "+1", "old", "k1", max_depth=10, at=1.0)
    await store.delete_session(SID)
    # The deleted session's owner, still running somewhere, is refused at once.
    with pytest.raises(NotOwner):
        await store.append_event(_event(1), fence=old)
    await store.create_session(SessionRecord(SID, "t1"))
    new = await store.new_fence(SID)
    assert new > old
    assert await store.pending(SID, 10, fence=new) == []  # starts clean
    assert await store.last_event(SID) is None
