"""A session's one upstream connection: opening it, reading it, dropping it.

`Connection` opens a link when the machine says so (loading the stored
credentials first), runs one reader task per link that turns what the
upstream sends into items for the session actor's inbox, and closes or aborts
it. Every item carries the connection's generation, so the actor ignores what
a connection it already left behind still produces. Acks and receipts are the
exception to the inbox: `on_delivery` records them at once (they change no
lifecycle state, every message brings one of each, and a hop through the inbox
per frame cost throughput). Time rules (the handshake's
deadlines) are the lifecycle machine's, not this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker.lifecycle.reasons import DisconnectCode
from broker.store.base import Store
from broker.store.crypto import CredentialDecryptError
from broker.store.kv import SessionKV
from broker.upstream.events import Acked, Disconnected, Receipt, UpstreamEvent
from broker.upstream.provider import ConnectError, Link, Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The connection of `generation` is up: its handshake begins."""

    generation: int


@dataclass(frozen=True, slots=True)
class LinkRefused:
    """The connection of `generation` was never attempted: the stored credentials
    do not decrypt (sealed with `key_id`, a key not configured or a wrong one)."""

    generation: int
    key_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """Something the connection of `generation` sent (or its end)."""

    generation: int
    event: UpstreamEvent


class Connection:
    """The session's current link (if any) and the task that opens and reads it."""

    __slots__ = ("_io_task", "_kv", "_lease_fresh", "_on_delivery", "_post", "_provider", "_spawn",
                 "_store", "generation", "link", "session_id")

    def __init__(
        self, session_id: str, *, store: Store, provider: Provider, kv: SessionKV,
        post: Callable[[LinkUp | LinkEvent | LinkRefused], None],
        lease_fresh: Callable[[], bool],
        on_delivery: Callable[[int, Acked | Receipt], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        """`lease_fresh`: asked again once the credentials are read, right before
        connecting. `spawn`: runs a task among the actor's background tasks. `kv`:
        the session's key-value area under the owner's fence, handed to the provider."""
        self.session_id = session_id
        self._store = store
        self._provider = provider
        self._kv = kv
        self._post = post
        self._lease_fresh = lease_fresh
        self._on_delivery = on_delivery
        self._spawn = spawn
        #: grows whenever a connection is opened or left behind
        self.generation = 0
        #: the open link of the current generation, None while there is none
        self.link: Link | None = None
        self._io_task: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Open a new link in the background and read it: `LinkUp`, then every event
        but acks and receipts (given to `on_delivery(generation, event)`) until
        the link ends; a link that fails ends as a close."""
        self.generation += 1
        self._io_task = self._spawn(self._connect(self.generation))

    def lost(self) -> None:
        """The link reported its end (the reader stops by itself)."""
        self.link = None

    def forget(self) -> Link | None:
        """Leave the current link behind: what it still produces is ignored. Returns
        it, for the caller to close or abort."""
        self.generation += 1
        link, self.link = self.link, None
        io_task, self._io_task = self._io_task, None
        if io_task is not None and not io_task.done():
            io_task.cancel()
        return link

    async def drop(
        self, code: DisconnectCode, reason: str, *, wait: bool = False, timeout_s: float = 3.0
    ) -> None:
        """Forget the current link and close it.

        With `wait`, the connection is closed before returning (aborted after
        `timeout_s`): a handover must not leave a live connection behind for
        the next owner to fight.
        """
        link = self.forget()
        if link is None:
            return
        if wait:
            try:
                async with asyncio.timeout(timeout_s):
                    await link.close(code, reason)
            except Exception:
                with contextlib.suppress(Exception):
                    link.abort()
        else:
            self._spawn(link.close(code, reason))

    def abort(self) -> None:
        """Forget the current link and abort its socket: nothing can hold this up."""
        link = self.forget()
        if link is not None:
            with contextlib.suppress(Exception):
                link.abort()

    async def _connect(self, generation: int) -> None:
        post = self._post
        try:
            creds = await self._store.load_credentials(self.session_id)
            if generation != self.generation:
                return  # superseded (or fenced) while the credentials were read
            if not self._lease_fresh():
                # Never connect on a lease that may be someone else's. Returning
                # quietly left the machine CONNECTING with no link and no deadline
                # for good; as a failed attempt it retries, and the retry's
                # OpenConnection fences if the lease is still not fresh.
                log.warning("session %s: lease went stale while the credentials were "
                            "read; not connecting", self.session_id)
                post(LinkEvent(generation, Disconnected(
                    DisconnectCode.CONNECTION_CLOSED, "lease not fresh: not connecting")))
                return
            link = await self._provider.connect(self.session_id, creds, self._kv)
        except ConnectError as exc:
            post(LinkEvent(generation, Disconnected(exc.code, exc.reason)))
            return
        except CredentialDecryptError as exc:  # no retry can help: the machine fails
            log.error("session %s: %s", self.session_id, exc)
            post(LinkRefused(generation, exc.key_id, str(exc)))
            return
        except Exception as exc:  # store down, provider bug: retry like a lost connection
            log.warning("session %s: connect failed: %s", self.session_id, exc)
            lost = Disconnected(DisconnectCode.CONNECTION_CLOSED, f"connect failed: {exc}")
            post(LinkEvent(generation, lost))
            return
        if generation != self.generation:
            link.abort()  # superseded (or fenced) while connecting
            return
        self.link = link
        # Read in this same task and frame: a nested coroutine would cost an idle
        # session a frame for as long as its connection lives.
        post(LinkUp(generation))
        on_delivery = self._on_delivery
        events = link.events()
        try:
            while True:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
                if isinstance(event, Acked | Receipt):
                    on_delivery(generation, event)
                    continue
                post(LinkEvent(generation, event))
                if isinstance(event, Disconnected):
                    return
        except Exception as exc:  # a provider bug must not leave the session hanging
            log.exception("session %s: upstream link failed", self.session_id)
            post(LinkEvent(generation, Disconnected(
                DisconnectCode.CONNECTION_CLOSED, f"link error: {exc}")))
        finally:
            await events.aclose()  # type: ignore[attr-defined]
