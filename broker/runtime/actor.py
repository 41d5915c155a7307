"""One actor per owned session: runs the lifecycle machine and does its I/O.

The machine decides; this module only moves bytes and timers (the sans-I/O
split of h11 / python-websockets). Everything that touches the session's
state goes through one inbox processed by one task, so no two coroutines
ever race on the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
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
from broker.runtime.batching import Batcher
from broker.runtime.bus import StatusBus
from broker.store.base import (
    Accepted,
    DeliveryResult,
    NewMessage,
    OutboxBatch,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    Store,
)
from broker.upstream import events as ev
from broker.upstream.provider import ConnectError, Link, Provider

log = logging.getLogger(__name__)



#: Messages awaiting acks from which the session's writes linger (`_pipelined`),
#: and for how long after that they still do while any message awaits its ack.
PIPELINED = 4
PIPELINED_HOLD_S = 0.1
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


class _Mailbox:
    """An unbounded single-reader queue: what the actor needs of asyncio.Queue.

    An asyncio.Queue carries three deques and an Event, ~2 KB per session that a
    broker holding ten thousand idle sessions pays for nothing.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: _Item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Item:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Wake:
    """A flag one task waits on with a timeout: the delivery loop's doorbell.

    asyncio.wait_for(event.wait(), t) makes a task per wait (Python 3.11); the
    loop waits once per burst of Sends, so this plain future and timer do it.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> bool:
        """Whether the flag was set (False: the timeout passed first)."""
        if self._set:
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _settle, waiter, None)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._set


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


_NOTHING_IN_FLIGHT: dict[str, tuple[OutboxMessage, float]] = {}
"""Shared by actors that have not delivered yet; _deliver gives each its own."""


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
        self._inbox = _Mailbox()
        self._timers: dict[act.Timer, tuple[int, asyncio.TimerHandle]] = {}
        self._timer_tokens = 0
        self._generation = 0
        self._link: Link | None = None
        self._io_task: asyncio.Task[None] | None = None
        self._delivery_task: asyncio.Task[None] | None = None
        self._wake = _Wake()
        self._ping_id = 0
        self._pipelined_until = 0.0
        self._sequence = 0
        #: emitted, not stored yet (the store was unavailable), oldest first
        self._unstored: list[StatusEvent] = []
        self._events_retry: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._ack_waiters: dict[str, list[asyncio.Future[DeliveryResult | None]]] = {}
        # Made on first use: ten thousand idle sessions should not carry them.
        self._batcher: Batcher[str | NewMessage, Accepted | None] | None = None
        # Delivery state of the current connection (reset by _deliver):
        #: sent and not yet acked, by message id: (message, when last sent);
        self._in_flight: dict[str, tuple[OutboxMessage, float]] = _NOTHING_IN_FLIGHT
        #: read from the store, not sent yet (the window is full), in order;
        self._ready: deque[OutboxMessage] | None = None
        #: the highest sequence read; everything up to it is in flight, ready or acked;
        self._newest = 0
        #: whether the store may hold messages not read yet.
        self._backlog = True

    @property
    def _writes(self) -> Batcher[str | NewMessage, Accepted | None]:
        """Acks (message ids) and new messages, written to the store in batches."""
        if self._batcher is None:
            self._batcher = Batcher(self._write_outbox, linger_s=self._settings.write_linger_s,
                                    loaded=self._pipelined)
        return self._batcher

    def _pipelined(self) -> bool:
        """Several messages await their acks: those acks, and the Sends they free,
        arrive within a round trip, so a write may linger to take them along.

        With a store that writes at once (memory) this is the only sign of load,
        and taking acks and Sends in bursts is what lets one session near the
        relay floor at 64 Sends in flight (docs/benchmarks.md). A lone Send, or
        a few, never waits. Once pipelined, a session stays so for a moment while
        anything is in flight: right after a batch of acks few messages are out,
        and dropping back to one write per message there tends to stick, since
        one write per message never has enough in flight to linger again.
        """
        now = asyncio.get_running_loop().time()
        if len(self._in_flight) >= PIPELINED:
            self._pipelined_until = now + PIPELINED_HOLD_S
            return True
        return bool(self._in_flight) and now < self._pipelined_until

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
        loop = asyncio.get_running_loop()
        done: asyncio.Future[DeliveryResult | None] = loop.create_future()
        waiters = self._ack_waiters.setdefault(message_id, [])
        waiters.append(done)
        timer = loop.call_later(timeout, _settle, done, None)
        try:
            return await done
        finally:
            timer.cancel()
            if done in waiters:
                waiters.remove(done)
            if not waiters:
                self._ack_waiters.pop(message_id, None)

    async def enqueue(self, message: NewMessage) -> Accepted:
        """Queue a Send's message (with the Sends and acks that arrive meanwhile, in
        one write) and get it delivered. Raises OutboxFull."""
        outcome = await self._writes.submit(message)  # raises OutboxFull
        assert outcome is not None  # None answers only acks
        return outcome

    def _ack(self, message_id: str) -> None:
        """Record an upstream ack (with the acks that arrive meanwhile, in one write)."""
        self._writes.post(message_id)

    async def _write_outbox(
        self, items: list[str | NewMessage]
    ) -> list[Accepted | BaseException | None]:
        """Write a batch of acks and new messages, then act on the answers.

        New messages are claimed for delivery in the same write while the
        delivery loop runs and nothing older is unread; the loop then sends them
        without asking the store again. Acks that cannot be stored leave their
        messages in the outbox: they are sent again after the ack timeout and
        the upstream acks the duplicate.
        """
        acks = [i for i in items if isinstance(i, str)]
        messages = [i for i in items if isinstance(i, NewMessage)]
        generation = self._generation
        claim = bool(messages) and self._delivering() and not self._backlog
        try:
            done = await self._store.apply_outbox(
                self.session_id, OutboxBatch(acks, messages, claim),
                max_depth=self._settings.max_outbox, at=self._clock(), fence=self.fence,
            )
        except Exception as exc:
            if isinstance(exc, NotOwner):
                self._not_owner(exc)  # the Sends' messages go in unfenced (manager)
            elif not isinstance(exc, StoreUnavailable):
                log.exception("session %s: outbox write failed", self.session_id)
            if acks:
                log.warning("session %s: %d acks not recorded, will resend: %s",
                            self.session_id, len(acks), exc)
            return [exc if isinstance(i, NewMessage) else None for i in items]
        if done.acked:
            self.stats.on_acked(len(done.acked))
            for result in done.acked:
                self._in_flight.pop(result.message_id, None)
                for waiter in self._ack_waiters.pop(result.message_id, ()):
                    _settle(waiter, result)
            self._wake.set()
        fresh = sum(1 for o in done.accepted if isinstance(o, Accepted) and not o.duplicate)
        if fresh:
            self.stats.on_accepted(fresh)
            if claim:
                self._hand_over(generation, done.claimed, done.unread)
            else:
                self.kick()
        accepted = iter(done.accepted)
        return [next(accepted) if isinstance(i, NewMessage) else None for i in items]

    def _delivering(self) -> bool:
        task = self._delivery_task
        return task is not None and not task.done()

    def _hand_over(self, generation: int, claimed: list[OutboxMessage], unread: bool) -> None:
        """Give messages claimed by an enqueue to the delivery loop that was running."""
        ready = self._ready
        if generation != self._generation or not self._delivering() or ready is None:
            self.kick()  # a new loop reads them from the store
            return
        for message in claimed:
            if message.sequence > self._newest:
                ready.append(message)
                self._newest = message.sequence
        if unread:
            self._backlog = True
        self._wake.set()

    def kick(self) -> None:
        """A message was queued: wake the delivery loop, or start it if it ended idle."""
        self._backlog = True
        self._wake.set()
        task = self._delivery_task
        if (task is None or task.done()) and self.machine.state == State.OPEN:
            self._start_delivery()

    def fence_now(self) -> None:
        """Stop all upstream I/O at once, without waiting for anything: the lease is,
        or may soon be, someone else's. Sockets are aborted, not closed politely,
        so no peer and no network can hold this up."""
        self.fenced = True
        self._cancel_all_timers()
        self._generation += 1
        self._stop_delivery()
        link, self._link = self._link, None
        io_task, self._io_task = self._io_task, None
        if io_task is not None and not io_task.done():
            io_task.cancel()
        if link is not None:
            with contextlib.suppress(Exception):
                link.abort()
        for waiters in self._ack_waiters.values():
            for waiter in waiters:
                _settle(waiter, None)  # the manager waits on the store from here

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
        # Messages already handed to the store are written whatever happens to
        # this actor: their Sends are waiting for the answer. (An ack left
        # unrecorded is harmless: the next owner resends, the upstream re-acks.)
        if self._batcher is not None:
            drain = asyncio.ensure_future(self._batcher.drain())
            done, _ = await asyncio.wait([drain], timeout=drain_timeout_s)
            if not done:
                drain.cancel()
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
                self._ack(mid)
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
                self._stop_delivery()
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
            if self._batcher is not None:
                await self._batcher.drain()
            self.blocked.set()
            for waiters in self._ack_waiters.values():
                for waiter in waiters:
                    _settle(waiter, None)
        else:
            self.blocked.clear()
        if emit.state == State.OPEN and emit.previous != State.OPEN:
            self._start_delivery()
        elif emit.state != State.OPEN:
            self._stop_delivery()
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
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
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
                        self._ack(event.message_id)
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
        self._stop_delivery()
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

    # delivery
    def _start_delivery(self) -> None:
        self._stop_delivery()
        if self._link is not None:
            self._delivery_task = self._spawn(self._deliver(self._link, self._generation))

    def _stop_delivery(self) -> None:
        task, self._delivery_task = self._delivery_task, None
        if task is not None and not task.done():
            task.cancel()

    async def _deliver(self, link: Link, generation: int) -> None:
        """Send the outbox in order, window by window; resend what stays unacked.

        Every (re)connect starts again from the oldest unacked message: the
        upstream de-duplicates by message id, so a resend is harmless while a
        skipped message would be lost. Within a connection the loop keeps what
        it read in memory: it asks the store only for messages after the newest
        one read, and only when some may be waiting (a kick, a full window).
        """
        in_flight: dict[str, tuple[OutboxMessage, float]] = {}
        ready: deque[OutboxMessage] = deque()
        self._in_flight, self._ready = in_flight, ready
        self._newest = 0
        self._backlog = True
        try:
            await self._delivery_loop(link, generation, in_flight, ready)
        finally:
            if self._ready is ready:  # an idle session keeps no delivery state
                self._in_flight, self._ready = _NOTHING_IN_FLIGHT, None

    async def _delivery_loop(
        self, link: Link, generation: int, in_flight: dict[str, tuple[OutboxMessage, float]],
        ready: deque[OutboxMessage],
    ) -> None:
        window = self._settings.send_window
        ack_timeout = self._settings.ack_timeout_s
        # Alone, every enqueue kicks this loop directly; with several instances a
        # kick from another one travels over pub/sub, so also look now and then.
        idle_poll = None if self._publish_locally else max(ack_timeout, 2.0)
        loop = asyncio.get_running_loop()
        claimed = False
        while generation == self._generation:
            self._wake.clear()
            room = window - len(in_flight) - len(ready)
            try:
                if not claimed:
                    taken = await self._store.claim_outbox(self.session_id, fence=self.fence)
                    claimed = True
                    if taken:
                        log.info("session %s: resuming %d read but unacked messages",
                                 self.session_id, taken)
                if self._backlog and room > 0:
                    fresh = await self._store.pending(self.session_id, window, self._newest,
                                                      fence=self.fence)
                    self._backlog = len(fresh) >= room
                    for message in fresh:
                        if message.sequence > self._newest:
                            ready.append(message)
                            self._newest = message.sequence
            except NotOwner as exc:
                self._not_owner(exc)
                return
            except StoreUnavailable as exc:
                log.warning("session %s: outbox unreachable, delivery paused: %s",
                            self.session_id, exc)
                await asyncio.sleep(1.0)
                continue
            now = loop.time()
            for message, sent in list(in_flight.values()):
                if now - sent >= ack_timeout and message.message_id in in_flight:
                    in_flight[message.message_id] = (message, now)
                    await link.send(message.message_id, message.to, message.body)
            while ready and len(in_flight) < window:
                message = ready.popleft()
                in_flight[message.message_id] = (message, now)
                await link.send(message.message_id, message.to, message.body)
            wait = ack_timeout if in_flight else idle_poll
            if wait is None:
                if not self._wake.is_set() and not ready and not self._backlog:
                    # Nothing queued, nothing in flight: end here rather than keep a
                    # parked task per idle session; kick() starts a new one.
                    return
                continue
            if not await self._wake.wait(wait) and not in_flight:
                self._backlog = True  # a kick from another instance may be lost
