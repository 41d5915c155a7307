"""Watches every session and logs a recommendation when it appears or changes,
so problems reach the log (and later alerts) without anyone calling Health."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from broker.lifecycle.health import Severity
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
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> None:
        for item in await self.manager.health():
            sid = item.view.record.session_id
            codes = frozenset(r.code for r in item.recommendations)
            if codes == self.current.get(sid, frozenset()):
                continue
            self.current[sid] = codes
            for rec in item.recommendations:
                level = logging.INFO if rec.severity == Severity.INFO else logging.WARNING
                log.log(level, "session %s: %s: %s", sid, rec.code, rec.message,
                        extra={"session_id": sid, "tenant": item.view.record.tenant})

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:
                log.exception("health monitor check failed")
