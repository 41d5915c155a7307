"""Operating the broker: metrics, webhook notifications, log context.

Everything here observes the runtime from outside (the status bus, actor
stats, a gRPC interceptor, log records) so the runtime stays unaware of it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from broker.store.base import StatusEvent

if TYPE_CHECKING:
    from broker.runtime.bus import StatusBus
    from broker.runtime.manager import SessionManager

log = logging.getLogger(__name__)


class BusFollower:
    """Hands every status event published on a bus to a callback, in one task.

    The bus cuts off a subscriber that falls behind; an observer must not stop
    observing because of that, so it subscribes again (and says what it missed).
    """

    def __init__(self, bus: StatusBus, handle: Callable[[StatusEvent], None], name: str,
                 buffer: int = 10_000) -> None:
        self._bus = bus
        self._handle = handle
        self._name = name
        self._buffer = buffer
        self._task: asyncio.Task[None] | None = None
        # Subscribe at once, not when the task first runs, so events published
        # between start() and the task's first step are not missed.
        self._sub = bus.subscribe(lambda _: True, buffer)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # ends it; never swallows our own cancel
        self._sub.close()

    async def _run(self) -> None:
        while True:
            event = await self._sub.get()
            if event is None:
                log.warning("%s fell behind the status bus; some events were not observed",
                            self._name)
                self._sub.close()
                self._sub = self._bus.subscribe(lambda _: True, self._buffer)
                continue
            try:
                self._handle(event)
            except Exception:
                log.exception("%s failed on an event of session %s", self._name,
                              event.session_id,
                              extra={"session_id": event.session_id, "tenant": event.tenant})


class SessionLogContext(logging.Filter):
    """Adds `session_id` and `tenant` to broker log records that lack them.

    The runtime's log lines follow one convention, `log.x("session %s: ...",
    session_id, ...)`; this fills the structured fields from that first
    argument and the owning manager, so every line about a session can be
    filtered by session and tenant in JSON logs without each call site
    repeating `extra=`. It never adds anything but those two fields.
    """

    def __init__(self) -> None:
        super().__init__()
        self._managers: weakref.WeakSet[SessionManager] = weakref.WeakSet()

    def watch(self, manager: SessionManager) -> None:
        self._managers.add(manager)

    def filter(self, record: logging.LogRecord) -> bool:
        sid = getattr(record, "session_id", None)
        if sid is None:
            args = record.args
            if (isinstance(record.msg, str) and record.msg.startswith("session %s")
                    and isinstance(args, tuple) and args and isinstance(args[0], str)):
                sid = args[0]
                record.session_id = sid
        if sid is not None and getattr(record, "tenant", None) is None:
            tenant = self._tenant_of(sid)
            if tenant is not None:
                record.tenant = tenant
        return True

    def _tenant_of(self, session_id: str) -> str | None:
        for manager in tuple(self._managers):
            actor = manager.actors.get(session_id)
            if actor is not None:
                return actor.tenant
        return None


_log_context = SessionLogContext()


def install_log_context(manager: SessionManager) -> None:
    """Attach the session context filter to every `broker.*` logger (idempotent).

    Logger filters, unlike handler filters, apply whatever handler the
    records end up in (`broker serve`'s, a test's, an embedding app's).
    """
    _log_context.watch(manager)
    names = [n for n in logging.Logger.manager.loggerDict
             if n == "broker" or n.startswith("broker.")]
    for name in names:
        logger = logging.getLogger(name)
        if _log_context not in logger.filters:
            logger.addFilter(_log_context)
