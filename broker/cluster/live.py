"""Writes the owned sessions' live state (what Health shows on other instances).

Written when it changes, per `broker.cluster.rules.LiveReports`, not every
round; fenced like every owner write. A session handed over gets a last
report that expires within a lease TTL; a dead owner's stays until the next
owner writes, and Health ignores it meanwhile (`Placement.is_live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping

from redis import exceptions as rexc

from broker.cluster.lease import Lease
from broker.cluster.rules import LiveReports
from broker.errors import NotOwner, StoreUnavailable
from broker.runtime.actor import SessionActor
from broker.store.base import LiveState, Store

_ERRORS = (rexc.RedisError, OSError, StoreUnavailable, asyncio.TimeoutError)
REPORTS_AT_ONCE = 64
"""Live reports written side by side."""


class LiveReporter:
    def __init__(self, store: Store, instance_id: str, *, fenced: Callable[[str], None],
                 rules: LiveReports | None = None) -> None:
        self._store = store
        self._instance_id = instance_id
        self._fenced = fenced
        self.rules = rules or LiveReports()

    def _live(self, actor: SessionActor, now: float) -> LiveState:
        return LiveState(actor.state, self._instance_id, actor.last_activity, now)

    async def report(self, owned: Mapping[str, Lease],
                     actors: Mapping[str, SessionActor]) -> None:
        """Write the live state of every owned session whose report is due,
        REPORTS_AT_ONCE side by side: after a takeover of thousands, one at a time
        held the claim round for as many round trips."""
        now = time.time()
        due = []
        for session_id, lease in list(owned.items()):
            actor = actors.get(session_id)
            if actor is None:
                continue
            state, activity = actor.state.value, actor.last_activity
            if self.rules.due(session_id, state, activity, now):
                due.append((session_id, lease, actor, state, activity))
        for start in range(0, len(due), REPORTS_AT_ONCE):
            results = await asyncio.gather(*(self._report_one(*item, now)
                                             for item in due[start:start + REPORTS_AT_ONCE]),
                                           return_exceptions=True)
            for result in results:  # the round hears a failure, as it did one at a time
                if isinstance(result, BaseException):
                    raise result

    async def _report_one(self, session_id: str, lease: Lease, actor: SessionActor,
                          state: str, activity: float, now: float) -> None:
        try:
            await self._store.report_live(session_id, self._live(actor, now),
                                          self.rules.ttl_s, fence=lease.token)
        except NotOwner:
            self._fenced(session_id)
            return
        self.rules.reported(session_id, state, activity, now)

    async def leaving(self, actor: SessionActor, lease: Lease, ttl_s: float) -> None:
        """A last report before the lease is released, expiring within `ttl_s`."""
        self.rules.forget(lease.session_id)
        with contextlib.suppress(*_ERRORS, NotOwner):
            async with asyncio.timeout(ttl_s / 4):
                await self._store.report_live(lease.session_id, self._live(actor, time.time()),
                                              ttl_s, fence=lease.token)

    def forget(self, session_id: str) -> None:
        self.rules.forget(session_id)
