"""The broker's domain API: sessions, sending, status and health.

Servicers and the CLI call this; it validates nothing about wire formats and
knows nothing about gRPC. It owns the actors of the sessions this process
runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from broker import validation
from broker.config import Settings
from broker.errors import (
    InvalidArgument,
    NotDeliveredYet,
    NotOwner,
    SessionExists,
    SessionNotFound,
    SessionNotReady,
)
from broker.lifecycle import inputs as inp
from broker.lifecycle.health import Recommendation, SessionStats, recommend
from broker.lifecycle.states import NEEDS_A_PERSON, SEND_REFUSALS, State
from broker.runtime.actor import SessionActor
from broker.runtime.bus import StatusBus, Subscription, session_filter
from broker.runtime.inbound import InboundService
from broker.runtime.ratelimit import RateLimiter, admit, rate_limiter
from broker.store.base import (
    Accepted,
    DeliveryResult,
    NewMessage,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    Store,
)
from broker.upstream.provider import Provider

log = logging.getLogger(__name__)
MIN_SEND_TIMEOUT_S = 0.01


@dataclass(frozen=True)
class SessionView:
    record: SessionRecord
    state: State
    reason: str
    code: int
    sequence: int
    updated_at: float
    has_credentials: bool
    outbox_depth: int


@dataclass(frozen=True)
class SendOutcome:
    message: OutboxMessage
    duplicate: bool
    result: DeliveryResult | None


@dataclass(frozen=True)
class HealthView:
    view: SessionView
    live_state: State | None
    stats: SessionStats
    recommendations: list[Recommendation]
    now: float
    attempt: int
    owner: str = ""
    last_activity: float = 0.0


@dataclass(frozen=True)
class QrView:
    session_id: str
    qr: str
    index: int
    expires_at: float | None


class Coordination(Protocol):
    """What the manager needs from scale-out (broker.cluster.Coordinator)."""

    instance_id: str

    def may_connect(self, session_id: str) -> bool: ...
    def fenced(self, session_id: str) -> None:
        """A session's actor was refused a write as stale: let the session go."""
        ...

    async def publish(self, op: str, session_id: str = "") -> None: ...
    async def wait_released(self, session_id: str) -> None:
        """Return once no instance holds the session's lease (bounded by the TTL)."""
        ...


class SessionManager:
    def __init__(
        self,
        store: Store,
        provider: Provider,
        settings: Settings | None = None,
        *,
        bus: StatusBus | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.provider = provider
        self.settings = settings or Settings()
        self.bus = bus or StatusBus(self.settings.subscriber_buffer)
        self.clock = clock
        self.actors: dict[str, SessionActor] = {}
        self.inbound = InboundService(store, self.settings)
        self.coordinator: Coordination | None = None
        self.limiter: RateLimiter = rate_limiter(self.settings, store)
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Resume every enabled session found in the store (alone: no coordinator)."""
        if self.coordinator is not None:
            return  # the coordinator claims sessions as leases allow
        for record in await self.store.list_sessions():
            if record.enabled:
                await self.run(record)

    async def close(self) -> None:
        actors, self.actors = self.actors, {}
        await asyncio.gather(*(a.shutdown() for a in actors.values()), return_exceptions=True)

    async def run(self, record: SessionRecord, fence: int | None = None) -> SessionActor:
        """Start this process's actor for a session it owns, under fencing token `fence`
        (the lease's; alone, a fresh one from the store)."""
        actor = self.actors.get(record.session_id)
        if actor is None:
            coordinator = self.coordinator
            if fence is None:
                fence = await self.store.new_fence(record.session_id)
            actor = SessionActor(
                record, store=self.store, provider=self.provider, bus=self.bus,
                settings=self.settings, clock=self.clock, fence=fence,
                may_connect=coordinator.may_connect if coordinator else None,
                on_fenced=coordinator.fenced if coordinator else self._fenced_alone,
                publish_locally=coordinator is None,
            )
            self.actors[record.session_id] = actor
            await actor.start()
            await actor.command(inp.Start())
        return actor

    def detach(self, session_id: str) -> SessionActor | None:
        """Stop routing to this session's actor here (the caller shuts it down)."""
        return self.actors.pop(session_id, None)

    def _fenced_alone(self, session_id: str) -> None:
        """Alone, only a delete (or a second process on the same store) fences a session."""
        actor = self.detach(session_id)
        if actor is not None:
            task = asyncio.get_running_loop().create_task(actor.shutdown())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _record(self, session_id: str) -> SessionRecord:
        validation.session_id(session_id)
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        return record

    async def view(self, record: SessionRecord) -> SessionView:
        last = await self.store.last_event(record.session_id)
        actor = self.actors.get(record.session_id)
        state = actor.state if actor else (last.state if last else State.STOPPED)
        if actor is not None:
            has_credentials = actor.has_credentials
        else:
            has_credentials = await self.store.has_credentials(record.session_id)
        return SessionView(
            record=record, state=state, reason=last.reason if last else "",
            code=last.code if last else 0, sequence=last.sequence if last else 0,
            updated_at=last.at if last else record.created_at,
            has_credentials=has_credentials,
            outbox_depth=await self.store.outbox_depth(record.session_id),
        )

    # admin
    async def create(self, session_id: str, tenant: str = "", *, start: bool = True) -> SessionView:
        validation.session_id(session_id)
        tenant = validation.tenant(tenant)
        async with self._lock:
            record, created = await self.store.create_session(
                SessionRecord(session_id, tenant, enabled=start, created_at=self.clock())
            )
            if record.tenant != tenant:
                raise SessionExists(
                    f"session {session_id!r} belongs to another tenant", session_id=session_id
                )
            if start and record.enabled:
                await self._activate(record)
        if created:
            log.info("session %s created for tenant %s", session_id, tenant)
        return await self.view(record)

    async def get(self, session_id: str) -> SessionView:
        return await self.view(await self._record(session_id))

    async def list_sessions(self, tenant: str = "") -> list[SessionView]:
        records = await self.store.list_sessions(validation.optional_tenant(tenant))
        return [await self.view(r) for r in records]

    async def _activate(self, record: SessionRecord) -> None:
        """Get an enabled session running: here, or by whichever instance claims it."""
        if self.coordinator is None:
            await self.run(record)
        else:
            await self.coordinator.publish("rebalance")

    async def _forward(self, op: str, session_id: str) -> bool:
        """Tell the owning instance (if another one) to act; False when running alone."""
        if self.coordinator is None:
            return False
        await self.coordinator.publish(op, session_id)
        return True

    async def stop(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        await self.store.set_enabled(session_id, False)
        actor = self.actors.get(session_id)
        if actor is not None:
            await actor.command(inp.Stop())
        else:
            await self._forward("stop", session_id)
        return await self.view(record)

    async def restart(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        await self.store.set_enabled(session_id, True)
        actor = self.actors.get(session_id)
        if actor is not None:
            await self.restart_local(actor)
        elif not await self._forward("restart", session_id):
            await self.run(record)
        else:
            await self._activate(record)
        return await self.view(record)

    async def restart_local(self, actor: SessionActor) -> None:
        if actor.state in (State.OPEN, State.CONNECTING, State.PAIRING):
            await actor.command(inp.Stop())
        await actor.command(inp.Start())

    async def logout(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        actor = self.actors.get(session_id)
        if actor is None and await self._forward("logout", session_id):
            return await self.view(record)
        if actor is not None:
            await actor.command(inp.Logout())
            if actor.state == State.OPEN:
                # The upstream answers a logout by closing with 401; give it a moment.
                try:
                    await asyncio.wait_for(actor.blocked.wait(), 5.0)
                except TimeoutError:
                    log.warning("session %s: upstream did not confirm logout", session_id)
        else:
            await self.store.clear_credentials(session_id)
        return await self.view(record)

    async def delete(self, session_id: str) -> None:
        """Stop the owner, wait until it let go, then remove the session's data: an owner
        still running would write it back (and the fence is raised on delete)."""
        await self._record(session_id)
        await self.store.set_enabled(session_id, False)
        actor = self.actors.get(session_id)
        if actor is not None:
            await actor.command(inp.Stop())
        if self.coordinator is not None:
            await self.coordinator.publish("delete", session_id)
            await self.coordinator.wait_released(session_id)
        actor = self.detach(session_id)
        if actor is not None:
            await actor.shutdown()
        await self.store.delete_session(session_id)

    async def qr(self, session_id: str) -> QrView:
        await self._record(session_id)
        actor = self.actors.get(session_id)
        if actor is None or actor.state != State.PAIRING or not actor.machine.qr:
            state = actor.state if actor else State.STOPPED
            raise SessionNotReady(
                f"session {session_id!r} is {state.value}, not pairing: no QR to scan",
                reason="NOT_PAIRING", session_id=session_id, state=state.value,
            )
        return QrView(session_id, actor.machine.qr, actor.qr_index, actor.qr_expires_at)

    # sending
    async def send(
        self,
        session_id: str,
        to: str,
        body: str,
        *,
        idempotency_key: str = "",
        wait: bool = True,
        timeout: float | None = None,
    ) -> SendOutcome:
        validation.session_id(session_id)
        validation.recipient(to)
        validation.body(body, self.settings.max_body_bytes)
        key = validation.idempotency_key(idempotency_key) or f"auto-{uuid.uuid4().hex}"
        if timeout is None:
            timeout = self.settings.default_send_timeout_s
        elif wait and timeout < MIN_SEND_TIMEOUT_S:
            raise InvalidArgument(
                "deadline", f"{timeout * 1000:.1f} ms is too short to wait for an upstream ack; "
                "set a longer deadline or no_wait",
            )
        elif timeout > self.settings.max_send_timeout_s:
            raise InvalidArgument(
                "deadline", f"{timeout:.0f}s is longer than the broker's maximum of "
                f"{self.settings.max_send_timeout_s:.0f}s",
            )
        # A session running here exists: no store read needed to know that.
        actor = self.actors.get(session_id)
        record = None if actor is not None else await self._record(session_id)

        accepted = await self._accept(session_id, record, actor, to, body, key)
        message = accepted.message
        if accepted.result is not None or not wait:
            return SendOutcome(message, accepted.duplicate, accepted.result)
        result = await self._wait_ack(session_id, message, actor, timeout)
        if result is None:
            state = actor.state if actor else State.STOPPED
            raise NotDeliveredYet(
                f"message {message.message_id} is queued but the upstream has not acked it "
                f"yet (session {state.value}); retry with the same idempotency key",
                session_id=session_id, message_id=message.message_id, state=state.value,
                retry_after_s=1.0,
            )
        return SendOutcome(message, accepted.duplicate, result)

    async def _accept(
        self, session_id: str, record: SessionRecord | None, actor: SessionActor | None,
        to: str, body: str, key: str,
    ) -> Accepted:
        """Queue the message, or find the one an earlier call queued under the key.

        The happy path is one store call (enqueue de-duplicates by key). The key
        is looked up first only where a refusal must not hide an earlier success:
        a session that cannot take messages now, and a rate limit that must not
        charge a retry of an accepted message.
        """
        try:
            await self._check_ready(session_id, record, actor)
        except SessionNotReady:
            known = await self.store.find_by_key(session_id, key)
            if known is None:
                raise
            return known
        if self.limiter.limits:
            known = await self.store.find_by_key(session_id, key)
            if known is not None:
                return known
            # Before enqueue: a message over the limit is never queued, so never sent.
            await admit(self.limiter, session_id)
        if actor is not None:
            try:
                return await actor.enqueue(NewMessage(to, body, key))
            except NotOwner:
                pass  # the session has a newer owner: queue it as any instance would
        accepted = await self.store.enqueue(
            session_id, to, body, key, max_depth=self.settings.max_outbox, at=self.clock()
        )
        if not accepted.duplicate:
            await self._forward("kick", session_id)
        return accepted

    async def _check_ready(
        self, session_id: str, record: SessionRecord | None, actor: SessionActor | None
    ) -> None:
        if actor is not None:
            state = actor.state
            if state not in NEEDS_A_PERSON and not actor.has_credentials:
                state = State.PAIRING
        elif record is None or not record.enabled or self.coordinator is None:
            state = State.STOPPED
        else:
            # Owned by another instance (or about to be claimed): judge by the
            # last state its owner recorded; STOPPED there means "between owners".
            last = await self.store.last_event(session_id)
            state = last.state if last else State.CONNECTING
            if state == State.STOPPED:
                state = State.CONNECTING
        if state in SEND_REFUSALS:
            reason, text = SEND_REFUSALS[state]
            raise SessionNotReady(
                f"session {session_id!r}: {text}", reason=reason, session_id=session_id,
                state=state.value,
            )

    async def _wait_ack(
        self, session_id: str, message: OutboxMessage, actor: SessionActor | None, timeout: float
    ) -> DeliveryResult | None:
        if actor is None:  # owned elsewhere: the store tells every instance of acks
            return await self.store.wait_result(session_id, message.message_id, timeout)
        # Owned here: the actor resolves one plain future on the ack, on a state
        # that needs a person, or the timer does; no tasks per call.
        started = asyncio.get_running_loop().time()
        outcome = await actor.wait_ack(message.message_id, timeout)
        if outcome is not None:
            return outcome
        if actor.fenced:  # it stopped owning meanwhile: the next owner delivers
            left = timeout - (asyncio.get_running_loop().time() - started)
            return await self.store.wait_result(session_id, message.message_id, max(0.0, left))
        if not actor.blocked.is_set():
            return None  # timed out
        result = await self.store.result(session_id, message.message_id)
        if result is not None:
            return result
        reason, text = SEND_REFUSALS.get(actor.state, ("SESSION_STOPPED", "stopped"))
        raise SessionNotReady(
            f"session {session_id!r}: {text}; message {message.message_id} stays queued and "
            "is sent once the session is open again",
            reason=reason, session_id=session_id, message_id=message.message_id,
            state=actor.state.value,
        )

    # status and health
    def subscribe(self, session_ids: Collection[str], tenant: str | None) -> Subscription:
        return self.bus.subscribe(session_filter(session_ids, tenant))

    async def snapshot(self, session_ids: Collection[str], tenant: str | None) -> list[StatusEvent]:
        wanted = set(session_ids)
        out: list[StatusEvent] = []
        for record in await self.store.list_sessions(tenant):
            if wanted and record.session_id not in wanted:
                continue
            last = await self.store.last_event(record.session_id)
            if last is None:
                last = StatusEvent(
                    session_id=record.session_id, tenant=record.tenant, sequence=0,
                    state=State.STOPPED, previous=State.STOPPED, reason="not started",
                    at=record.created_at,
                )
            out.append(last)
        return out

    async def health(self, session_ids: Collection[str] = (), tenant: str = "") -> list[HealthView]:
        validation.optional_tenant(tenant)  # bad input first, then NOT_FOUND
        for sid in session_ids:
            await self._record(sid)
        views = await self.list_sessions(tenant)
        wanted = set(session_ids)
        now = self.clock()
        out = []
        for view in views:
            if wanted and view.record.session_id not in wanted:
                continue
            actor = self.actors.get(view.record.session_id)
            stats = actor.stats if actor else SessionStats()
            recs = recommend(
                view.state, stats, now=now, outbox_depth=view.outbox_depth,
                reason=view.reason, code=view.code, session_id=view.record.session_id,
            )
            live_state: State | None
            if actor is not None:
                owner = self.coordinator.instance_id if self.coordinator else "local"
                live_state, activity = actor.state, actor.last_activity
            else:
                live = await self.store.get_live(view.record.session_id)
                owner = live.owner if live else ""
                live_state = live.state if live else None
                activity = live.last_activity if live else 0.0
            out.append(HealthView(view, live_state, stats, recs, now,
                                  actor.machine.attempt if actor else 0, owner, activity))
        return out
