"""broker/cluster/coordinator.py: a stop that lands as the claim loop is woken still
stops it. On Python 3.11, `asyncio.wait_for` returns the awaited result when a
cancel arrives in the same turn as that result (CPython gh-86296); redis-py
calls it for every command, so the cancel was lost inside the round's Redis
calls, the loop went on claiming, `stop()` waited for it for good, and a broker
never exited (seen as hung teardowns in the Baileys tests). Made red once by not
installing broker/compat.py, which puts 3.12's `wait_for` in place."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from broker.backends import open_backend
from broker.cluster.coordinator import Coordinator
from broker.config import Settings
from broker.runtime.manager import SessionManager
from broker.upstream.provider import Provider
from tests.helpers import FAST_POLICY, eventually, within
from tests.redis_server import RedisServer

TURNS = range(8)
"""Loop turns between the wake and the stop: the race sits at one of the first few."""


async def test_a_stop_right_after_a_wake_ends_the_claim_loop(
    redis_server: RedisServer, credential_env: dict[str, str],
) -> None:
    redis_server.flushall()
    for turns in TURNS:
        settings = Settings(store_url=redis_server.url, lifecycle=FAST_POLICY,
                            instance_id=f"stop-{turns}")
        backend = open_backend(settings)
        # No session is created: the provider is never asked to connect.
        manager = SessionManager(backend.store, cast(Provider, object()), settings,
                                 placement=backend.placement, limiter=backend.limiter)
        coordinator = manager.placement
        assert isinstance(coordinator, Coordinator)
        await manager.start()
        try:
            # The claim loop is the one waiter on its wake flag: it sleeps between rounds.
            wake: Any = coordinator._wake
            await eventually(lambda: bool(wake._waiters), 10.0,  # noqa: B023 (awaited here)
                             "the claim loop to wait for its next round")
            coordinator.wake()
            for _ in range(turns):
                await asyncio.sleep(0)
        finally:
            await within(manager.close(), 20.0, f"a stop {turns} turns after a wake")
        await backend.store.close()
