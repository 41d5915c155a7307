"""broker/cluster/live.py: due live reports are written side by side (a takeover of
thousands must not hold the claim round for as many round trips), each fenced,
and a refused one lets its session go. Made red once by writing them one at a
time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest

from broker.cluster import live
from broker.cluster.lease import Lease
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle.states import State
from broker.runtime.actor import SessionActor
from broker.store.base import LiveState, Store


class Reports:
    """Takes a live report after a turn of the loop or two; refuses `stale` ones."""

    def __init__(self, stale: frozenset[str] = frozenset(), down: bool = False) -> None:
        self.stale = stale
        self.down = down
        self.written: dict[str, tuple[LiveState, int | None]] = {}
        self.in_flight = 0
        self.most_in_flight = 0

    async def report_live(self, session_id: str, state: LiveState, ttl_s: float, *,
                          fence: int | None = None) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if self.down:
                raise StoreUnavailable("down")
            if session_id in self.stale:
                raise NotOwner(session_id)
            self.written[session_id] = (state, fence)
        finally:
            self.in_flight -= 1


def _owned(n: int) -> tuple[dict[str, Lease], dict[str, SessionActor]]:
    ids = [f"lr{i}" for i in range(n)]
    leases = {sid: Lease(sid, "me", token) for token, sid in enumerate(ids, 1)}
    actors = {sid: cast(SessionActor, SimpleNamespace(state=State.OPEN, last_activity=0.0))
              for sid in ids}
    return leases, actors


async def test_due_reports_go_side_by_side_each_with_its_fence() -> None:
    store = Reports(stale=frozenset({"lr7"}))
    fenced: list[str] = []
    reporter = live.LiveReporter(cast(Store, store), "me", fenced=fenced.append)
    leases, actors = _owned(300)
    await reporter.report(leases, actors)
    assert 1 < store.most_in_flight <= live.REPORTS_AT_ONCE
    assert fenced == ["lr7"]
    assert set(store.written) == set(leases) - {"lr7"}
    assert all(fence == leases[sid].token for sid, (_, fence) in store.written.items())
    store.most_in_flight = 0
    await reporter.report(leases, actors)  # nothing changed: only the refused one is due
    assert fenced == ["lr7", "lr7"] and store.most_in_flight == 1


async def test_a_store_failure_reaches_the_round() -> None:
    reporter = live.LiveReporter(cast(Store, Reports(down=True)), "me", fenced=print)
    leases, actors = _owned(3)
    with pytest.raises(StoreUnavailable):
        await reporter.report(leases, actors)
