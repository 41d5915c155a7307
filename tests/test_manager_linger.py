"""SessionManager.send tells the session's outbox writer whether a message may
wait for company: a unary Send trickles in and may linger; a many-Sends call's
messages (SendStream, SendBatch) arrive together and are written at once. Made
red once by letting every message linger."""

from __future__ import annotations

from broker.config import Settings
from broker.runtime.actor import SessionActor
from broker.runtime.manager import SessionManager
from broker.runtime.sendflow import SendItem
from broker.store.memory import MemoryStore
from broker.upstream.null import NullProvider


async def test_only_unary_sends_may_linger() -> None:
    manager = SessionManager(MemoryStore(), NullProvider(), Settings())
    try:
        await manager.create("s")
        actor = manager.actors["s"]
        seen: list[bool] = []
        enqueue = SessionActor.enqueue

        async def spy(message, *, linger=True):  # type: ignore[no-untyped-def]
            seen.append(linger)
            return await enqueue(actor, message, linger=linger)

        actor.enqueue = spy  # type: ignore[method-assign]
        await manager.send("s", "+1555", "unary", wait=False)
        items = [SendItem(ref=i, session_id="s", to="+1555", body=f"m{i}", wait=False)
                 for i in range(3)]
        outcomes = await manager.send_many(items)
        assert all(not isinstance(o, Exception) for o in outcomes)
        assert seen == [True, False, False, False]
    finally:
        await manager.close()
