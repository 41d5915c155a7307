"""Where a session runs: the seam between the manager and ownership.

The manager never asks which deployment it is in; it is given a `Placement`
at construction: `LocalPlacement` (one process owns every session) or the
leased placement of `broker.cluster.coordinator` (Redis leases decide, any
instance may own any session). Both answer the same questions: start and
stop owning, get an enabled session an owner, forward an operator's request
to the owner, and what an actor needs (may it connect, who hears it was
fenced, where its status events go).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from broker.store.base import SessionRecord, StatusEvent

if TYPE_CHECKING:
    from broker.runtime.manager import SessionManager


class Op(enum.Enum):
    """What one instance asks the owner of a session to do."""

    KICK = "kick"
    """A message was queued: deliver it."""
    STOP = "stop"
    RESTART = "restart"
    LOGOUT = "logout"
    DELETE = "delete"
    """Let the session go for good (the caller then removes its data)."""


class Placement(Protocol):
    @property
    def instance_id(self) -> str:
        """This instance's name, as Health reports the owner."""
        ...

    @property
    def shared(self) -> bool:
        """Whether other instances may own sessions: then a session not running here
        is judged by the state its owner stored, not taken for stopped."""
        ...

    @property
    def outbox_poll_s(self) -> float | None:
        """How often an idle owner looks at its outbox anyway: kicks from other
        instances travel over the network and may be lost (None: never needed)."""
        ...

    async def start(self) -> None:
        """Begin owning sessions (alone: all enabled ones; leased: as leases allow)."""
        ...

    async def stop(self) -> None:
        """Let every session go (leased: hand them over)."""
        ...

    async def activate(self, record: SessionRecord) -> None:
        """An enabled session needs an owner."""
        ...

    async def forward(self, op: Op, session_id: str) -> bool:
        """Ask the session's owner elsewhere to act; False when none can exist."""
        ...

    async def wait_released(self, session_id: str) -> None:
        """Return once no instance owns the session (bounded)."""
        ...

    def may_connect(self, session_id: str) -> bool:
        """Asked by an actor before every connection attempt."""
        ...

    def is_live(self, instance_id: str) -> bool:
        """Whether the owner named in a stored live report still runs."""
        ...

    def fenced(self, session_id: str) -> None:
        """An actor was refused a write as stale (or stopped owning): drop it."""
        ...

    def publish(self, event: StatusEvent) -> None:
        """Where a stored status event goes next, for this instance's subscribers."""
        ...


class LocalPlacement:
    """One process, every session: no leases, status events straight to the bus.

    Fencing still applies (the store grants each actor a token), so a session
    deleted while its actor ran is refused, and only a delete fences alone."""

    instance_id = "local"
    shared = False
    outbox_poll_s: float | None = None

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for record in await self._manager.store.list_sessions():
            if record.enabled:
                await self._manager.run(record)

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(tuple(self._background))

    async def activate(self, record: SessionRecord) -> None:
        await self._manager.run(record)

    async def forward(self, op: Op, session_id: str) -> bool:
        return False

    async def wait_released(self, session_id: str) -> None:
        return None

    def may_connect(self, session_id: str) -> bool:
        return True

    def is_live(self, instance_id: str) -> bool:
        return True

    def fenced(self, session_id: str) -> None:
        actor = self._manager.detach(session_id)
        if actor is not None:
            task = asyncio.get_running_loop().create_task(actor.shutdown())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def publish(self, event: StatusEvent) -> None:
        self._manager.bus.publish(event)


PlacementFactory = Callable[["SessionManager"], Placement]
