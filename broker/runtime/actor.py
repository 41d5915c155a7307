"""One actor per owned session: the loop that feeds the session's two pure
machines and carries out what they decide.

The lifecycle machine (`broker.lifecycle.machine`) decides states, timers and
connections; the delivery window (`broker.runtime.window`, driven by
`broker.runtime.delivery`) decides what to send and when to read the outbox.
This module only moves bytes and timers (the sans-I/O split of h11 /
python-websockets): operator commands, timer firings and link events go
through one inbox processed by one task, so no two coroutines ever race on
the machine. Acks are the exception: the link reader hands them straight to
the delivery side (see `broker.runtime.delivery`), since they change no
lifecycle state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker import content as contents
from broker.config import Settings
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle import actions, inputs
from broker.lifecycle.health import SessionStats
from broker.lifecycle.machine import SessionMachine
from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import NEEDS_A_PERSON, State
from broker.runtime.delivery import Delivery
from broker.runtime.link import Connection, LinkEvent, LinkRefused, LinkUp
from broker.runtime.mailbox import Mailbox
from broker.runtime.recorder import StatusRecorder
from broker.runtime.timers import TimerDue, Timers
from broker.runtime.updates import RECEIPTS
from broker.store.base import (
    Accepted,
    DeliveryResult,
    InboundOrigin,
    NewMessage,
    Refusal,
    SessionRecord,
    StatusEvent,
    Store,
)
from broker.store.kv import SessionKV
from broker.upstream import events as upstream_events
from broker.upstream.provider import Link, Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Command:
    event: inputs.Event
    done: asyncio.Future[None]


@dataclass(frozen=True)
class _StoreEvents:
    """Try again to store the status events the store could not take."""


_Item = inputs.Event | LinkEvent | LinkRefused | LinkUp | TimerDue | _Command | _StoreEvents
_STORE_EVENTS = _StoreEvents()


class SessionActor:
    """One session's loop: inbox items in, lifecycle actions carried out.

    It owns the machine, its timers (`Timers`), the upstream connection
    (`Connection`), status events (`StatusRecorder`) and delivery (`Delivery`),
    and the ownership rules around them: every owner write carries `fence`, a
    refused one stops everything at once (`_not_owner`, `fence_now`), and no
    connection is opened on a lease that may be stale (`_lease_fresh`).
    """

    def __init__(
        self,
        record: SessionRecord,
        *,
        store: Store,
        provider: Provider,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        fence: int | None = None,
        may_connect: Callable[[str], bool] | None = None,
        on_fenced: Callable[[str], None] | None = None,
        publish: Callable[[StatusEvent], None] | None = None,
        outbox_poll_s: float | None = None,
    ) -> None:
        """`fence`: the fencing token every owner write carries (None: unfenced).
        `may_connect`: asked before every connection attempt (the lease is fresh).
        `on_fenced`: told once the store refused a write as stale, after all
        upstream I/O has stopped; the owner of this actor must then drop it.
        `publish`: where each stored status event goes next (this instance's
        subscribers). `outbox_poll_s`: how often an idle delivery loop looks at
        the outbox anyway, for kicks that may be lost on their way from other
        instances (None: every enqueue kicks this actor directly)."""
        self.session_id = record.session_id
        self.fence = fence
        self.fenced = False
        """Set once this actor stopped owning: no I/O, no writes from here on."""
        self.stopping = False
        """Set when shutdown begins: no more of the machine's actions are executed."""
        self._may_connect = may_connect
        self._on_fenced = on_fenced
        self.tenant = record.tenant
        self._store = store
        self._clock = clock
        self._settings = settings
        self.machine = SessionMachine(settings.lifecycle,
                                      handshake_timeout_s=settings.connect_timeout_s)
        self.stats = SessionStats()
        self.blocked = asyncio.Event()
        self.blocked.set()
        self.has_credentials = False
        self.last_activity = 0.0
        self._inbox: Mailbox[_Item] = Mailbox()
        self._timers = Timers(self._inbox)
        self.kv = SessionKV(store, self.session_id, fence, on_not_owner=self._not_owner)
        self._conn = Connection(
            self.session_id, store=store, provider=provider, kv=self.kv,
            post=self._inbox.put_nowait,
            lease_fresh=self._lease_fresh, on_delivery=self._on_delivery, spawn=self._spawn,
        )
        self._ping_id = 0
        self._events = StatusRecorder(
            self.session_id, self.tenant, store=store, fence=fence, publish=publish,
            retry=self._retry_events,
        )
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.delivery = Delivery(
            self.session_id, store=store, settings=settings, stats=self.stats, clock=clock,
            fence=fence, not_owner=self._not_owner, spawn=self._spawn,
            outbox_poll_s=outbox_poll_s,
        )

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def latest_event(self) -> StatusEvent | None:
        """This actor's latest status change, stored or not (None before its first)."""
        return self._events.latest

    @property
    def qr_index(self) -> int:
        return self.machine.qr_index

    @property
    def link(self) -> Link | None:
        """The open upstream link, if any (for requests that ask the upstream, such
        as a pairing code; lifecycle and delivery go through the machine)."""
        return self._conn.link

    @property
    def qr_expires_at(self) -> float | None:
        """When the QR on show expires, on this actor's (wall) clock, for the API.

        The machine keeps it on the loop's clock, the one its timers run on."""
        expires = self.machine.qr_expires_at
        if expires is None:
            return None
        return self._clock() + (expires - asyncio.get_running_loop().time())

    async def start(self) -> None:
        last = await self._store.last_event(self.session_id)
        self._events.sequence = last.sequence if last else 0
        self.has_credentials = await self._store.has_credentials(self.session_id)
        if self.fenced:
            return  # lost (or shut down) while reading: never start running
        self._task = asyncio.create_task(self._run(), name=f"actor:{self.session_id}")

    async def command(self, event: inputs.Event) -> None:
        """Feed an operator command and return once the machine has handled it
        (at once if this actor no longer runs)."""
        task = self._task
        if self.fenced or task is None or task.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Command(event, done))
        await asyncio.wait([done, task], return_when=asyncio.FIRST_COMPLETED)

    async def wait_ack(self, message_id: str, timeout: float) -> DeliveryResult | None:
        """The ack of a message this actor delivers; None on timeout or once the
        session needs a person (check `blocked`). Call right after enqueueing,
        before yielding, so an ack cannot slip past."""
        if self.blocked.is_set() or self.fenced:
            return None
        return await self.delivery.wait_ack(message_id, timeout)

    async def enqueue(self, message: NewMessage, *, linger: bool = True) -> Accepted:
        """Queue a Send's message (with the Sends and acks that arrive meanwhile, in
        one write) and get it delivered. Raises OutboxFull. `linger`: see
        Delivery.enqueue."""
        return await self.delivery.enqueue(message, linger=linger)

    def kick(self) -> None:
        """A message was queued (maybe by another instance): deliver it if OPEN."""
        self.delivery.kick()

    def fence_now(self) -> None:
        """Stop all upstream I/O at once, without waiting for anything: the lease is,
        or may soon be, someone else's. Sockets are aborted, not closed politely,
        so no peer and no network can hold this up."""
        self.fenced = True
        self._cancel_all_timers()
        self.delivery.stop()
        self._conn.abort()
        self.delivery.release_waiters()  # the manager waits on the store from here

    def _not_owner(self, exc: NotOwner) -> None:
        """The store refused a write as stale: a newer owner exists. Stop at once."""
        if self.fenced:
            return
        log.warning("session %s: %s; stopping at once", self.session_id, exc)
        self.fence_now()
        if self._on_fenced is not None:
            self._on_fenced(self.session_id)

    async def shutdown(self, *, close_timeout_s: float = 3.0, drain_timeout_s: float = 5.0) -> None:
        """Stop all I/O without recording a state change (process exit, handover).

        The upstream connection is closed (within `close_timeout_s`, else
        aborted) before anything else, so a next owner never meets it; then
        what the store was handed is written, within `drain_timeout_s`. The
        caller's own cancellation is never swallowed.
        """
        self.stopping = True  # from here the machine's actions are not carried out
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            # Returns on its end (raises on our own cancellation), or gives up: what
            # the task still does is harmless once `stopping` (and then `fenced`) holds.
            await asyncio.wait([task], timeout=close_timeout_s + 1.0)
            if not task.done():
                log.warning("session %s: actor task did not stop when cancelled", self.session_id)
        self._cancel_all_timers()
        if not self.fenced:
            await self._drop_link(DisconnectCode.CONNECTION_CLOSED, "broker shutting down",
                                  wait=True, timeout_s=close_timeout_s)
        self.fence_now()
        await self.delivery.shutdown(drain_timeout_s)
        for task in tuple(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(tuple(self._background))

    def _cancel_all_timers(self) -> None:
        self._timers.cancel_all()
        self._events.cancel_retry()

    def _retry_events(self) -> None:
        self._inbox.put_nowait(_STORE_EVENTS)

    # the one loop
    async def _run(self) -> None:
        while True:
            item = await self._inbox.get()
            try:
                await self._handle(item)
            except asyncio.CancelledError:
                raise
            except NotOwner as exc:
                self._not_owner(exc)
            except Exception:
                log.exception("session %s: error handling %r", self.session_id, type(item))
            finally:
                if isinstance(item, _Command) and not item.done.done():
                    item.done.set_result(None)

    async def _handle(self, item: _Item) -> None:
        match item:
            case _Command(event=event):
                await self._feed(event)
            case TimerDue(timer=timer):
                if self._timers.fired(item):  # else cancelled or re-armed since
                    await self._feed(inputs.TimerFired(timer))
            case _StoreEvents():
                await self._events.store_due()
            case LinkUp(generation=gen):
                if gen == self._conn.generation and not self.fenced:
                    await self._feed(inputs.LinkUp())
            case LinkRefused(generation=gen, key_id=key_id, detail=detail):
                if gen == self._conn.generation and not self.fenced:
                    await self._feed(inputs.CredentialsUnreadable(key_id, detail))
            case LinkEvent(generation=gen, event=event):
                if gen != self._conn.generation or self.fenced:
                    return  # a link the machine already closed
                self.last_activity = self._clock()
                await self._on_link_event(event)
            case _:
                await self._feed(item)

    async def _on_link_event(self, event: upstream_events.UpstreamEvent) -> None:
        match event:
            case upstream_events.Ready():
                await self._feed(inputs.Connected())
            case upstream_events.QrCode(code=code, index=index, expires_in_ms=expires):
                await self._feed(inputs.QrReceived(code, index, expires))
            case upstream_events.Paired(credentials=creds):
                await self._feed(inputs.Paired(creds))
            case upstream_events.Pong():
                self.stats.on_keepalive_ok()
                await self._feed(inputs.PongReceived())
            case upstream_events.Acked() | upstream_events.Receipt():
                self._record(event)  # the link reader takes these (`_on_delivery`)
            case upstream_events.Refused(message_id=mid, code=code, reason=why):
                log.warning("session %s: the upstream refused message %s (%s %s)",
                            self.session_id, mid, code, why)
                self.delivery.refuse(Refusal(mid, code, why))
            case upstream_events.Inbound(message_id=mid, sender=sender, body=body):
                # Durable first, ack second: if storing fails the upstream keeps
                # the message and re-sends it; a re-sent one is stored only once.
                origin = InboundOrigin(event.sender_lid, event.push_name, event.chat,
                                       max(0.0, event.ts))
                content, media = contents.keep_inbound(event.content,
                                                       self._settings.max_media_bytes)
                try:
                    await self._store.add_inbound(self.session_id, mid, sender, body,
                                                  self._clock(), fence=self.fence, origin=origin,
                                                  content=content, media=media)
                except StoreUnavailable as exc:
                    log.warning("session %s: inbound %s not stored, not acked: %s",
                                self.session_id, mid, exc)
                    return
                if self._conn.link is not None:
                    await self._conn.link.ack_inbound(mid)
            case upstream_events.Disconnected(code=code, reason=reason, retry_after_ms=retry):
                self._conn.lost()
                self.delivery.stop()
                if code == DisconnectCode.REPLACED and not self._lease_fresh():
                    # Replaced while our lease may already be another instance's:
                    # that is the broker's own next owner, not a stranger. Let go
                    # quietly instead of reporting (and storing) a CONFLICT.
                    self._not_owner(NotOwner("replaced by the session's next owner"))
                    return
                await self._feed(inputs.Closed(code, reason, retry))
            case _:
                pass

    async def _feed(self, event: inputs.Event) -> None:
        # The machine's clock (for the attempt budget): monotonic, like its timers.
        now = asyncio.get_running_loop().time()
        for action in self.machine.handle(event, now=now):
            await self._execute(action)

    async def _execute(self, action: actions.Action) -> None:
        if self.stopping or self.fenced:
            return
        match action:
            case actions.OpenConnection():
                await self._drop_link(DisconnectCode.CONNECTION_CLOSED, "reconnecting")
                if not self._lease_fresh():
                    # Self-fencing at the point of I/O: never connect on a lease
                    # that may already be someone else's. No state is recorded:
                    # losing a lease is the broker's business, not the session's.
                    self._not_owner(NotOwner("not connecting without a fresh lease"))
                    return
                self._conn.open()
            case actions.CloseConnection(code=code, reason=reason):
                await self._drop_link(code, reason)
            case actions.SendPing():
                if self._conn.link is not None:
                    self._ping_id += 1
                    self.stats.on_keepalive_sent()
                    await self._conn.link.ping(self._ping_id)
            case actions.SendLogout():
                if self._conn.link is not None:
                    await self._conn.link.logout()
            case actions.StartTimer(timer=timer, delay_s=delay, slack_s=slack):
                self._timers.start(timer, delay, slack)
            case actions.CancelTimer(timer=timer):
                self._timers.cancel(timer)
            case actions.SaveCredentials(credentials=creds):
                await self._store.save_credentials(self.session_id, creds, fence=self.fence)
                self.has_credentials = True
            case actions.ClearCredentials():
                await self._store.clear_credentials(self.session_id, fence=self.fence)
                self.has_credentials = False
            case actions.ClearKeys():
                await self.kv.clear()
            case actions.Emit():
                await self._emit(action)

    async def _emit(self, emit: actions.Emit) -> None:
        now = self._clock()
        self._events.record(emit, now)
        # Every emit: a 515 restart (CONNECTING again) is an attempt too.
        self.stats.on_transition(emit.previous, emit.state, emit.reason, emit.code, now,
                                 held_s=emit.held_s)
        if emit.state != emit.previous:
            log.info(
                "session %s: %s -> %s (%s)", self.session_id, emit.previous, emit.state,
                emit.reason, extra={"session_id": self.session_id, "tenant": self.tenant},
            )
        if emit.state in NEEDS_A_PERSON:
            # Acks that came in before this change are stored first: a waiter
            # released now must find its message's result if it was acked.
            await self.delivery.drain()
            self.blocked.set()
            self.delivery.release_waiters()
        else:
            self.blocked.clear()
        if emit.state == State.OPEN and emit.previous != State.OPEN:
            if self._conn.link is not None:
                self.delivery.start(self._conn.link)
        elif emit.state != State.OPEN:
            self.delivery.stop()
        await self._events.store()

    # connection I/O
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _lease_fresh(self) -> bool:
        return self._may_connect is None or self._may_connect(self.session_id)

    def _on_delivery(self, generation: int, event: upstream_events.Acked | upstream_events.Receipt
                     ) -> None:
        """An upstream ack or receipt, straight from the link reader (not through the
        inbox): what `_on_link_event` would do with it."""
        if generation != self._conn.generation or self.fenced:
            return
        self.last_activity = self._clock()
        self._record(event)

    def _record(self, event: upstream_events.Acked | upstream_events.Receipt) -> None:
        """An ack or a receipt, to delivery (which stores it as a status update too)."""
        if isinstance(event, upstream_events.Acked):
            self.delivery.ack(event.message_id)
        else:
            receipt = RECEIPTS.get(event.status)
            if receipt is not None:
                self.delivery.receipt(event.message_id, receipt)

    async def _drop_link(
        self, code: DisconnectCode, reason: str, *, wait: bool = False, timeout_s: float = 3.0
    ) -> None:
        """Stop delivering and close the current link (see `Connection.drop`)."""
        self.delivery.stop()
        await self._conn.drop(code, reason, wait=wait, timeout_s=timeout_s)
