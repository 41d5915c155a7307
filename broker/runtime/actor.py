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
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker.config import Settings
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle import actions as act
from broker.lifecycle import inputs as inp
from broker.lifecycle.health import SessionStats
from broker.lifecycle.machine import SessionMachine
from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import NEEDS_A_PERSON, State
from broker.runtime.bus import StatusBus
from broker.runtime.delivery import Delivery
from broker.runtime.mailbox import Mailbox
from broker.store.base import (
    Accepted,
    DeliveryResult,
    NewMessage,
    SessionRecord,
    StatusEvent,
    Store,
)
from broker.upstream import events as ev
from broker.upstream.provider import ConnectError, Link, Provider

log = logging.getLogger(__name__)



EVENT_RETRY_S = 1.0
"""How soon status events the store refused (unavailable) are offered again."""


@dataclass(frozen=True)
class _LinkEvent:
    generation: int
    event: ev.UpstreamEvent


@dataclass(frozen=True)
class _LinkUp:
    generation: int


@dataclass(frozen=True)
class _TimerDue:
    timer: act.Timer
    token: int


@dataclass(frozen=True)
class _Command:
    event: inp.Event
    done: asyncio.Future[None]


@dataclass(frozen=True)
class _StoreEvents:
    """Try again to store the status events the store could not take."""


_Item = inp.Event | _LinkEvent | _LinkUp | _TimerDue | _Command | _StoreEvents


class SessionActor:
    def __init__(
        self,
        record: SessionRecord,
        *,
        store: Store,
        provider: Provider,
        bus: StatusBus,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        fence: int | None = None,
        may_connect: Callable[[str], bool] | None = None,
        on_fenced: Callable[[str], None] | None = None,
        publish_locally: bool = True,
    ) -> None:
        """`fence`: the fencing token every owner write carries (None: unfenced).
        `may_connect`: asked before every connection attempt (the lease is fresh).
        `on_fenced`: told once the store refused a write as stale, after all
        upstream I/O has stopped; the owner of this actor must then drop it."""
        self.session_id = record.session_id
        self.fence = fence
        self.fenced = False
        """Set once this actor stopped owning: no I/O, no writes from here on."""
        self.stopping = False
        """Set when shutdown begins: no more of the machine's actions are executed."""
        self._may_connect = may_connect
        self._on_fenced = on_fenced
        self._publish_locally = publish_locally
        self.tenant = record.tenant
        self._store = store
        self._provider = provider
        self._bus = bus
        self._settings = settings
        self._clock = clock
        self.machine = SessionMachine(settings.lifecycle,
                                      handshake_timeout_s=settings.connect_timeout_s)
        self.stats = SessionStats()
        self.blocked = asyncio.Event()
        self.blocked.set()
        self.has_credentials = False
        self.last_activity = 0.0
        self._inbox: Mailbox[_Item] = Mailbox()
        self._timers: dict[act.Timer, tuple[int, asyncio.TimerHandle]] = {}
        self._timer_tokens = 0
        self._generation = 0
        self._link: Link | None = None
        self._io_task: asyncio.Task[None] | None = None
        self._ping_id = 0
        self._sequence = 0
        #: emitted, not stored yet (the store was unavailable), oldest first
        self._unstored: list[StatusEvent] = []
        self._events_retry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.delivery = Delivery(
            self.session_id, store=store, settings=settings, stats=self.stats, clock=clock,
            fence=fence, not_owner=self._not_owner, spawn=self._spawn,
            publish_locally=publish_locally,
        )

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def qr_index(self) -> int:
        return self.machine.qr_index

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
        self._sequence = last.sequence if last else 0
        self.has_credentials = await self._store.has_credentials(self.session_id)
        if self.fenced:
            return  # lost (or shut down) while reading: never start running
        self._task = asyncio.create_task(self._run(), name=f"actor:{self.session_id}")

    async def command(self, event: inp.Event) -> None:
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

    async def enqueue(self, message: NewMessage) -> Accepted:
        """Queue a Send's message (with the Sends and acks that arrive meanwhile, in
        one write) and get it delivered. Raises OutboxFull."""
        return await self.delivery.enqueue(message)

    def kick(self) -> None:
        """A message was queued (maybe by another instance): deliver it if OPEN."""
        self.delivery.kick()

    def fence_now(self) -> None:
        """Stop all upstream I/O at once, without waiting for anything: the lease is,
        or may soon be, someone else's. Sockets are aborted, not closed politely,
        so no peer and no network can hold this up."""
        self.fenced = True
        self._cancel_all_timers()
        self._generation += 1
        self.delivery.stop()
        link, self._link = self._link, None
        io_task, self._io_task = self._io_task, None
        if io_task is not None and not io_task.done():
            io_task.cancel()
        if link is not None:
            with contextlib.suppress(Exception):
                link.abort()
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
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._events_retry is not None:
            self._events_retry.cancel()

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
            case _TimerDue(timer=timer, token=token):
                current = self._timers.get(timer)
                if current is None or current[0] != token:
                    return  # cancelled or re-armed after this firing was queued
                del self._timers[timer]
                await self._feed(inp.TimerFired(timer))
            case _StoreEvents():
                if self._events_retry is None or not self._unstored:
                    return
                await self._store_events()
            case _LinkUp(generation=gen):
                if gen == self._generation and not self.fenced:
                    await self._feed(inp.LinkUp())
            case _LinkEvent(generation=gen, event=event):
                if gen != self._generation or self.fenced:
                    return  # a link the machine already closed
                self.last_activity = self._clock()
                await self._on_link_event(event)
            case _:
                await self._feed(item)

    async def _on_link_event(self, event: ev.UpstreamEvent) -> None:
        match event:
            case ev.Ready():
                await self._feed(inp.Connected())
            case ev.QrCode(code=code, index=index, expires_in_ms=expires):
                await self._feed(inp.QrReceived(code, index, expires))
            case ev.Paired(credentials=creds):
                await self._feed(inp.Paired(creds))
            case ev.Pong():
                self.stats.on_keepalive_ok()
                await self._feed(inp.PongReceived())
            case ev.Acked(message_id=mid):  # normally taken by _connect, off the inbox
                self.delivery.ack(mid)
            case ev.Inbound(message_id=mid, sender=sender, body=body):
                # Durable first, ack second: if storing fails the upstream keeps
                # the message and re-sends it; a re-sent one is stored only once.
                try:
                    await self._store.add_inbound(self.session_id, mid, sender, body,
                                                  self._clock(), fence=self.fence)
                except StoreUnavailable as exc:
                    log.warning("session %s: inbound %s not stored, not acked: %s",
                                self.session_id, mid, exc)
                    return
                if self._link is not None:
                    await self._link.ack_inbound(mid)
            case ev.Disconnected(code=code, reason=reason, retry_after_ms=retry):
                self._link = None
                self.delivery.stop()
                if code == DisconnectCode.REPLACED and not self._lease_fresh():
                    # Replaced while our lease may already be another instance's:
                    # that is the broker's own next owner, not a stranger. Let go
                    # quietly instead of reporting (and storing) a CONFLICT.
                    self._not_owner(NotOwner("replaced by the session's next owner"))
                    return
                await self._feed(inp.Closed(code, reason, retry))
            case _:
                pass

    async def _feed(self, event: inp.Event) -> None:
        # The machine's clock (for the attempt budget): monotonic, like its timers.
        now = asyncio.get_running_loop().time()
        for action in self.machine.handle(event, now=now):
            await self._execute(action)

    async def _execute(self, action: act.Action) -> None:
        if self.stopping or self.fenced:
            return
        match action:
            case act.OpenConnection():
                await self._drop_link(DisconnectCode.CONNECTION_CLOSED, "reconnecting")
                if not self._lease_fresh():
                    # Self-fencing at the point of I/O: never connect on a lease
                    # that may already be someone else's. No state is recorded:
                    # losing a lease is the broker's business, not the session's.
                    self._not_owner(NotOwner("not connecting without a fresh lease"))
                    return
                self._generation += 1
                self._io_task = self._spawn(self._connect(self._generation))
            case act.CloseConnection(code=code, reason=reason):
                await self._drop_link(code, reason)
            case act.SendPing():
                if self._link is not None:
                    self._ping_id += 1
                    self.stats.on_keepalive_sent()
                    await self._link.ping(self._ping_id)
            case act.SendLogout():
                if self._link is not None:
                    await self._link.logout()
            case act.StartTimer(timer=timer, delay_s=delay):
                self._cancel_timer(timer)
                self._timer_tokens += 1
                token = self._timer_tokens
                handle = asyncio.get_running_loop().call_later(
                    delay, self._inbox.put_nowait, _TimerDue(timer, token)
                )
                self._timers[timer] = (token, handle)
            case act.CancelTimer(timer=timer):
                self._cancel_timer(timer)
            case act.SaveCredentials(credentials=creds):
                await self._store.save_credentials(self.session_id, creds, fence=self.fence)
                self.has_credentials = True
            case act.ClearCredentials():
                await self._store.clear_credentials(self.session_id, fence=self.fence)
                self.has_credentials = False
            case act.Emit():
                await self._emit(action)

    def _cancel_timer(self, timer: act.Timer) -> None:
        entry = self._timers.pop(timer, None)
        if entry is not None:
            entry[1].cancel()

    async def _emit(self, emit: act.Emit) -> None:
        now = self._clock()
        self._sequence += 1
        event = StatusEvent(
            session_id=self.session_id, tenant=self.tenant, sequence=self._sequence,
            state=emit.state, previous=emit.previous, reason=emit.reason, code=emit.code,
            retry_in_s=emit.retry_in_s, qr=emit.qr, attempt=emit.attempt, at=now,
        )
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
            if self._link is not None:
                self.delivery.start(self._link)
        elif emit.state != State.OPEN:
            self.delivery.stop()
        self._unstored.append(event)
        await self._store_events()

    async def _store_events(self) -> None:
        """Store emitted events in order; while the store is away, keep them and try
        again later, so the stored state never stays behind the live one."""
        self._events_retry = None
        while self._unstored:
            try:
                stored = await self._store.append_event(self._unstored[0], fence=self.fence)
            except StoreUnavailable as exc:
                log.warning("session %s: %d status events not stored yet: %s",
                            self.session_id, len(self._unstored), exc)
                self._events_retry = asyncio.get_running_loop().call_later(
                    EVENT_RETRY_S, self._inbox.put_nowait, _StoreEvents())
                return
            del self._unstored[0]
            if self._publish_locally:
                self._bus.publish(stored)

    # connection I/O
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _lease_fresh(self) -> bool:
        return self._may_connect is None or self._may_connect(self.session_id)

    async def _connect(self, generation: int) -> None:
        post = self._inbox.put_nowait
        try:
            creds = await self._store.load_credentials(self.session_id)
            if not self._lease_fresh() or generation != self._generation:
                return  # the lease went stale while the credentials were read
            link = await self._provider.connect(self.session_id, creds)
        except ConnectError as exc:
            post(_LinkEvent(generation, ev.Disconnected(exc.code, exc.reason)))
            return
        except Exception as exc:  # store down, provider bug: retry like a lost connection
            log.warning("session %s: connect failed: %s", self.session_id, exc)
            lost = ev.Disconnected(DisconnectCode.CONNECTION_CLOSED, f"connect failed: {exc}")
            post(_LinkEvent(generation, lost))
            return
        if generation != self._generation:
            link.abort()  # superseded (or fenced) while connecting
            return
        self._link = link
        # The machine arms its HANDSHAKE deadline from here: until `ready` it, not
        # this reader, decides how long the upstream may take.
        post(_LinkUp(generation))
        events = link.events()
        try:
            while True:
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
                if isinstance(event, ev.Acked):
                    # An ack changes no state: record it from here, without a hop
                    # through the inbox (and the machine) per ack.
                    if generation == self._generation:
                        self.last_activity = self._clock()
                        self.delivery.ack(event.message_id)
                    continue
                post(_LinkEvent(generation, event))
                if isinstance(event, ev.Disconnected):
                    return
        except Exception as exc:  # a provider bug must not leave the session hanging
            log.exception("session %s: upstream link failed", self.session_id)
            post(_LinkEvent(generation, ev.Disconnected(
                DisconnectCode.CONNECTION_CLOSED, f"link error: {exc}")))
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _drop_link(
        self, code: DisconnectCode, reason: str, *, wait: bool = False, timeout_s: float = 3.0
    ) -> None:
        """Forget the current link; events it still produces are ignored.

        With `wait`, the connection is closed before returning (aborted after
        `timeout_s`): a handover must not leave a live connection behind for
        the next owner to fight.
        """
        self._generation += 1
        self.delivery.stop()
        link, self._link = self._link, None
        io_task, self._io_task = self._io_task, None
        if io_task is not None and not io_task.done():
            io_task.cancel()
        if link is not None:
            if wait:
                try:
                    await asyncio.wait_for(link.close(code, reason), timeout_s)
                except Exception:
                    with contextlib.suppress(Exception):
                        link.abort()
            else:
                self._spawn(link.close(code, reason))
