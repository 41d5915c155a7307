"""A session's status events: numbered, stored in order, then published.

While the store is unavailable the events are kept (oldest first) and offered
again after `EVENT_RETRY_S`, through the actor's inbox, so the stored state
never stays behind the live one and the retry never races the actor's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker.errors import StoreUnavailable
from broker.lifecycle.actions import Emit
from broker.store.base import StatusEvent, Store

log = logging.getLogger(__name__)

EVENT_RETRY_S = 1.0
"""How soon status events the store refused (unavailable) are offered again."""


class StatusRecorder:
    """Turns the machine's `Emit`s into stored, published `StatusEvent`s."""

    __slots__ = ("_fence", "_publish", "_retry", "_retry_handle", "_store",
                 "latest", "sequence", "session_id", "tenant", "unstored")

    def __init__(
        self, session_id: str, tenant: str, *, store: Store, fence: int | None,
        publish: Callable[[StatusEvent], None] | None, retry: Callable[[], None],
    ) -> None:
        """`retry`: asks the actor to call `store_due` later, from its own loop.
        `publish`: where each stored event goes next (the placement's choice:
        this process's bus, or nothing when the store's event feed tells every
        instance)."""
        self.session_id = session_id
        self.tenant = tenant
        self._store = store
        self._fence = fence
        self._publish = publish
        self._retry = retry
        self._retry_handle: asyncio.TimerHandle | None = None
        #: the sequence number of the latest event (stored or not)
        self.sequence = 0
        #: emitted, not stored yet (the store was unavailable), oldest first
        self.unstored: list[StatusEvent] = []
        #: the latest event (stored or not): what the session's state is now, while
        #: the stored one may still lag behind it by a write
        self.latest: StatusEvent | None = None

    def record(self, emit: Emit, at: float) -> StatusEvent:
        """Number an emitted change (which happened at `at`) and queue it for storing."""
        self.sequence += 1
        event = StatusEvent(
            session_id=self.session_id, tenant=self.tenant, sequence=self.sequence,
            state=emit.state, previous=emit.previous, reason=emit.reason, code=emit.code,
            retry_in_s=emit.retry_in_s, qr=emit.qr, attempt=emit.attempt, at=at,
        )
        self.unstored.append(event)
        self.latest = event
        return event

    async def store(self) -> None:
        """Store queued events in order; while the store is away, keep them and
        have the actor try again later."""
        self._retry_handle = None
        while self.unstored:
            try:
                stored = await self._store.append_event(self.unstored[0], fence=self._fence)
            except StoreUnavailable as exc:
                log.warning("session %s: %d status events not stored yet: %s",
                            self.session_id, len(self.unstored), exc)
                self._retry_handle = asyncio.get_running_loop().call_later(
                    EVENT_RETRY_S, self._retry)
                return
            del self.unstored[0]
            if self._publish is not None:
                self._publish(stored)

    async def store_due(self) -> None:
        """The retry's turn: store what is kept, unless that already happened."""
        if self._retry_handle is None or not self.unstored:
            return
        await self.store()

    def cancel_retry(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
