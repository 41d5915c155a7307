"""SessionManager.create: creates of one session id run one at a time, so its
actor starts once under the fence the store holds; creates of different ids run
side by side (their store round trips overlap). Made red once with each rule
broken: no lock (two actors, the first under a stale fence) and one lock for
every id (never more than one create in the store at once)."""

from __future__ import annotations

import asyncio

from broker.config import Settings
from broker.runtime.manager import SessionManager
from broker.store.base import SessionRecord
from broker.store.memory import MemoryStore
from broker.upstream.null import NullProvider


class SlowCreates(MemoryStore):
    """Each create and each new fence takes a turn of the loop or several, as a
    store round trip does; counts creates in progress at once."""

    def __init__(self) -> None:
        super().__init__()
        self.in_create = 0
        self.most_in_create = 0

    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        self.in_create += 1
        self.most_in_create = max(self.most_in_create, self.in_create)
        try:
            await asyncio.sleep(0.005)
            return await super().create_session(record)
        finally:
            self.in_create -= 1

    async def new_fence(self, session_id: str) -> int:
        await asyncio.sleep(0.005)
        return await super().new_fence(session_id)


async def test_creates_of_one_id_start_one_actor_under_the_current_fence() -> None:
    store = SlowCreates()
    manager = SessionManager(store, NullProvider(), Settings())
    try:
        sessions = [f"c{i}" for i in range(6)]
        await asyncio.gather(*(manager.create(sid) for sid in sessions for _ in range(5)))
        assert sorted(manager.actors) == sessions
        for sid in sessions:
            assert manager.actors[sid].fence == store._fences[sid]
    finally:
        await manager.close()


async def test_creates_of_different_ids_run_side_by_side() -> None:
    store = SlowCreates()
    manager = SessionManager(store, NullProvider(), Settings())
    try:
        await asyncio.gather(*(manager.create(f"p{i}") for i in range(16)))
        assert len(manager.actors) == 16
        assert store.most_in_create > 1
    finally:
        await manager.close()
