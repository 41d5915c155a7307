"""`SessionKV`: one session's key-value area, as its owner's provider sees it.

An engine that keeps its own auth state (Baileys: `creds` and the signal key
store) reads and writes it here instead of on its own disk, so the session can
move to another broker instance without pairing again. The accessor is bound
to the owning actor's fencing token: once another owner took the session,
every write raises NotOwner, exactly like the actor's own writes, and the
actor stops.

Key names used by the Baileys engine (and by `broker sessions import`):
``creds`` for Baileys' `AuthenticationCreds`, ``<type>:<id>`` for a signal key
(``pre-key:5``, ``session:4917...@s.whatsapp.net.0``, ...). Values are the
`BufferJSON` text as UTF-8 bytes; the store treats them as opaque.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from broker.errors import NotOwner
from broker.store.base import OutboxMessage, Store


class SessionKV:
    """The key-value area of `session_id`, written under the owner's `fence`."""

    __slots__ = ("_fence", "_on_not_owner", "_store", "session_id")

    def __init__(
        self, store: Store, session_id: str, fence: int | None, *,
        on_not_owner: Callable[[NotOwner], None] | None = None,
    ) -> None:
        """`on_not_owner`: told of a refused (stale) write before it is raised, so the
        actor stops owning at once whichever part of the engine made the write."""
        self._store = store
        self.session_id = session_id
        self._fence = fence
        self._on_not_owner = on_not_owner

    def __repr__(self) -> str:  # never the values
        return f"SessionKV({self.session_id!r}, fence={self._fence!r})"

    async def get(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The stored values of `keys`; missing keys are absent from the result."""
        if not keys:
            return {}
        return await self._store.kv_get(self.session_id, keys)

    async def set(self, values: Mapping[str, bytes | None]) -> None:
        """Write all `values` atomically (None deletes); raises NotOwner when fenced."""
        if values:
            try:
                await self._store.kv_set(self.session_id, values, fence=self._fence)
            except NotOwner as exc:
                self._refused(exc)
                raise

    async def clear(self) -> None:
        """Delete the whole area (logged out, bad session); raises NotOwner when fenced."""
        try:
            await self._store.kv_clear(self.session_id, fence=self._fence)
        except NotOwner as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: NotOwner) -> None:
        if self._on_not_owner is not None:
            self._on_not_owner(exc)

    async def sent_message(self, message_id: str) -> OutboxMessage | None:
        """A message this session sent, by the broker's message id (which the Baileys
        engine uses as WhatsApp's message id): unacked, or acked within the store's
        sent-message retention. For answering Baileys' `getMessage` retry requests."""
        return await self._store.sent_message(self.session_id, message_id)
