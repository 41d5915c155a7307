"""Watches every session and logs a recommendation when it appears or changes,
so problems reach the log (and later alerts) without anyone calling Health."""

from __future__ import annotations

import asyncio
import logging

from broker.lifecycle.health import Severity, recommend
from broker.lifecycle.states import State
from broker.runtime.manager import SessionManager

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, manager: SessionManager, interval_s: float) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.current: dict[str, frozenset[str]] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="health-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # ends it; never swallows our own cancel

    async def check(self) -> None:
        """Only the sessions this instance runs, from their actors: each instance
        watches what it owns, and a check costs no store reads but the outbox depth of
        sessions that are delivering or cannot (an open, idle one has none)."""
        now = self.manager.clock()
        actors = dict(self.manager.actors)
        for gone in set(self.current) - set(actors):
            del self.current[gone]
        for sid, actor in actors.items():
            if actor.state == State.OPEN and actor.delivery.idle:
                depth = 0  # its loop ended on an empty outbox; a Send starts it again
            else:
                depth = await self.manager.store.outbox_depth(sid)
            recommendations = recommend(
                actor.state, actor.stats, now=now, outbox_depth=depth,
                reason=actor.machine.reason, code=actor.machine.code, session_id=sid,
            )
            codes = frozenset(r.code for r in recommendations)
            if codes == self.current.get(sid, frozenset()):
                continue
            self.current[sid] = codes
            for rec in recommendations:
                level = logging.INFO if rec.severity == Severity.INFO else logging.WARNING
                log.log(level, "session %s: %s: %s", sid, rec.code, rec.message,
                        extra={"session_id": sid, "tenant": actor.tenant})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("health monitor check failed")
