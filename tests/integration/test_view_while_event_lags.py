"""A session's view pairs its live state with that state's own reason, also while
the store has not yet taken the event that announced it (a slow write): the
running actor's latest change wins over the stored one. Made red once by reading
the reason from the store only (the Health view then showed OPEN with the
previous state's reason).
"""

from __future__ import annotations

import asyncio

from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker.store.base import StatusEvent
from broker.store.memory import MemoryStore
from broker_client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from tests.conftest import BrokerFactory
from tests.helpers import wait_state

SESSIONS = [f"lag{i}" for i in range(4)]


class HeldOpenEvents(MemoryStore):
    """Holds every OPEN event's write until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.held = 0

    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        if event.state == State.OPEN:
            self.held += 1
            await self.release.wait()
        return await super().append_event(event, fence=fence)


async def test_view_shows_the_live_state_with_its_own_reason(
    sim: Simulator, make_broker: BrokerFactory,
) -> None:
    store = HeldOpenEvents()
    app = await make_broker(store=store)
    assert app.manager is not None
    for sid in SESSIONS:
        await app.manager.create(sid)
        await wait_state(app, sid, State.PAIRING)
        assert await sim.scan(sid)
    for sid in SESSIONS:
        await wait_state(app, sid, State.OPEN)
    try:
        for sid in SESSIONS:
            stored = await store.last_event(sid)
            assert stored is not None and stored.state != State.OPEN  # still behind
        async with BrokerClient(app.address, retry_attempts=1) as client:
            for h in await client.health(SESSIONS):
                live = app.manager.actors[h.session.session_id].latest_event
                assert live is not None and live.state == State.OPEN
                assert h.session.state == pb.OPEN
                assert (h.session.reason, h.session.sequence) == (live.reason, live.sequence)
            for sid in SESSIONS:
                view = await client.get_session(sid)
                assert view.state == pb.OPEN and view.reason == \
                    app.manager.actors[sid].latest_event.reason  # type: ignore[union-attr]
    finally:
        store.release.set()
