"""The broker's domain API: sessions, sending, status and health.

The servicers, metrics and webhooks call this. It checks its inputs (through
broker.validation), raises typed domain errors and knows nothing about gRPC.
It owns the actors of the sessions this process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import cast

from broker import validation
from broker.config import Settings
from broker.content import Content, Presence, split_text
from broker.content import encode as encode_content
from broker.errors import (
    BrokerError,
    ErrorReason,
    InvalidArgument,
    MessageRefused,
    NotDeliveredYet,
    NotOwner,
    PairingRefused,
    PresenceNotSent,
    RateLimited,
    Reason,
    SessionExists,
    SessionNotFound,
    SessionNotReady,
)
from broker.lifecycle import inputs
from broker.lifecycle.health import Recommendation, SessionStats, recommend
from broker.lifecycle.states import CREDENTIALS_UNREADABLE_PREFIX, NEEDS_A_PERSON, State
from broker.runtime import watch as watching
from broker.runtime.actor import SessionActor
from broker.runtime.bus import StatusBus, Subscription, session_filter
from broker.runtime.inbound import InboundService
from broker.runtime.media import MediaService
from broker.runtime.placement import LocalPlacement, Op, Placement, PlacementFactory
from broker.runtime.ratelimit import (
    LocalLimiter,
    RateLimiter,
    TokenBucket,
    Unlimited,
    admit,
    rate_limiter,
)
from broker.runtime.sendflow import Guard, SendFlow, SendItem, send_all
from broker.runtime.updates import UpdatesService
from broker.runtime.watch import Watched
from broker.store.base import (
    Accepted,
    DeliveryResult,
    NewMessage,
    OutboxMessage,
    SessionRecord,
    Store,
)
from broker.upstream.provider import PairingUnavailable, Provider

log = logging.getLogger(__name__)
MIN_SEND_TIMEOUT_S = 0.01


def _nothing() -> None:
    """`placed` of a lone Send: nobody waits for its place."""
LIST_CONCURRENCY = 64
PRESENCE_BURST = 5

_NOT_READY: dict[State, tuple[Reason, str]] = {
    State.LOGGED_OUT: (
        ErrorReason.LOGGED_OUT, "the session is logged out; pair it again (broker qr)"
    ),
    State.PAIRING: (
        ErrorReason.NEEDS_PAIRING, "the session is waiting for its QR code to be scanned"
    ),
    State.STOPPED: (ErrorReason.SESSION_STOPPED, "the session is stopped; restart it first"),
    State.CONFLICT: (
        ErrorReason.SESSION_CONFLICT,
        "another client outside the broker uses this login; stop it, then restart the session",
    ),
    State.FAILED: (
        ErrorReason.SESSION_FAILED, "the session gave up; see Health, then restart it"
    ),
}


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
    engine: str = ""


@dataclass(frozen=True)
class QrView:
    session_id: str
    qr: str
    index: int
    expires_at: float | None


class SessionManager:
    def __init__(
        self,
        store: Store,
        provider: Provider,
        settings: Settings | None = None,
        *,
        bus: StatusBus | None = None,
        clock: Callable[[], float] = time.time,
        placement: PlacementFactory = LocalPlacement,
        limiter: RateLimiter | None = None,
    ) -> None:
        """`placement`: builds where sessions run, given this manager (alone, or
        by lease: `broker.cluster.coordinator.Coordinator`); `limiter`: how Sends
        are rate limited (default: in this process, as `settings` say)."""
        self.store = store
        self.provider = provider
        self.settings = settings or Settings()
        self.bus = bus or StatusBus(self.settings.subscriber_buffer)
        self.clock = clock
        self.actors: dict[str, SessionActor] = {}
        self.inbound = InboundService(store, self.settings)
        self.updates = UpdatesService(store, self.settings)
        self.media = MediaService(store)
        # In process unless the backend shares buckets between instances.
        self.limiter: RateLimiter = limiter or rate_limiter(self.settings)
        # Presence is sent by the owning actor of this process only: local buckets.
        presence = TokenBucket.from_settings(self.settings.presence_rate, PRESENCE_BURST)
        self.presence_limiter: RateLimiter = (
            LocalLimiter(presence) if presence is not None else Unlimited())
        self._creating = _KeyedLock()
        self.placement: Placement = placement(self)

    async def start(self) -> None:
        """Begin owning sessions, as the placement decides."""
        await self.placement.start()

    async def close(self) -> None:
        """Let every session go (handed over where others can own them), then stop."""
        await self.placement.stop()
        actors, self.actors = self.actors, {}
        await asyncio.gather(*(a.shutdown() for a in actors.values()), return_exceptions=True)

    async def run(self, record: SessionRecord, fence: int | None = None) -> SessionActor:
        """Start this process's actor for a session it owns, under fencing token `fence`
        (the lease's; alone, a fresh one from the store)."""
        actor = self.actors.get(record.session_id)
        if actor is None:
            placement = self.placement
            if fence is None:
                fence = await self.store.new_fence(record.session_id)
            actor = SessionActor(
                record, store=self.store, provider=self.provider, settings=self.settings,
                clock=self.clock, fence=fence, may_connect=placement.may_connect,
                on_fenced=placement.fenced, publish=placement.publish,
                outbox_poll_s=placement.outbox_poll_s,
            )
            self.actors[record.session_id] = actor
            await actor.start()
            await actor.command(inputs.Start())
        return actor

    def detach(self, session_id: str) -> SessionActor | None:
        """Stop routing to this session's actor here (the caller shuts it down)."""
        return self.actors.pop(session_id, None)

    async def _record(self, session_id: str) -> SessionRecord:
        validation.session_id(session_id)
        record = await self.store.get_session(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        return record

    async def view(self, record: SessionRecord) -> SessionView:
        actor = self.actors.get(record.session_id)
        # The running actor's own latest change, else the stored one: the stored
        # event may lag the live state by a write, and a view must not pair the
        # live state with the previous state's reason.
        last = actor.latest_event if actor is not None else None
        if last is None:
            last = await self.store.last_event(record.session_id)
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
        async with self._creating.hold(session_id):  # one id at a time; ids side by side
            record, created = await self.store.create_session(
                SessionRecord(session_id, tenant, enabled=start, created_at=self.clock())
            )
            if record.tenant != tenant:
                raise SessionExists(
                    f"session {session_id!r} belongs to another tenant", session_id=session_id
                )
            if start and record.enabled:
                await self.placement.activate(record)
        if created:
            log.info("session %s created for tenant %s", session_id, tenant)
        return await self.view(record)

    async def get(self, session_id: str) -> SessionView:
        return await self.view(await self._record(session_id))

    async def list_sessions(self, tenant: str = "") -> list[SessionView]:
        """Every session's view; the store reads of up to LIST_CONCURRENCY sessions at
        once, so a long list costs a few round trips of latency, not one per read."""
        records = await self.store.list_sessions(validation.optional_tenant(tenant))
        views: list[SessionView] = []
        for start in range(0, len(records), LIST_CONCURRENCY):
            chunk = records[start:start + LIST_CONCURRENCY]
            views += await asyncio.gather(*(self.view(r) for r in chunk))
        return views

    async def stop(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        await self.store.set_enabled(session_id, False)
        actor = self.actors.get(session_id)
        if actor is not None:
            await actor.command(inputs.Stop())
        else:
            await self.placement.forward(Op.STOP, session_id)
        return await self.view(record)

    async def restart(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        await self.store.set_enabled(session_id, True)
        actor = self.actors.get(session_id)
        if actor is not None:
            await self.restart_local(actor)
        else:  # owned elsewhere (it restarts there), or by nobody yet
            await self.placement.forward(Op.RESTART, session_id)
            await self.placement.activate(record)
        return await self.view(record)

    async def restart_local(self, actor: SessionActor) -> None:
        if actor.state in (State.OPEN, State.CONNECTING, State.PAIRING):
            await actor.command(inputs.Stop())
        await actor.command(inputs.Start())

    async def logout(self, session_id: str) -> SessionView:
        record = await self._record(session_id)
        actor = self.actors.get(session_id)
        if actor is None and await self.placement.forward(Op.LOGOUT, session_id):
            return await self.view(record)
        if actor is not None:
            await actor.command(inputs.Logout())
            if actor.state == State.OPEN:
                # The upstream answers a logout by closing with 401; give it a moment.
                try:
                    async with asyncio.timeout(5.0):
                        await actor.blocked.wait()
                except TimeoutError:
                    log.warning("session %s: upstream did not confirm logout", session_id)
        else:
            await self.store.clear_credentials(session_id)
            await self.store.kv_clear(session_id)
        return await self.view(record)

    async def delete(self, session_id: str) -> None:
        """Stop the owner, wait until it let go, then remove the session's data: an owner
        still running would write it back (and the fence is raised on delete)."""
        await self._record(session_id)
        await self.store.set_enabled(session_id, False)
        actor = self.actors.get(session_id)
        if actor is not None:
            await actor.command(inputs.Stop())
        await self.placement.forward(Op.DELETE, session_id)
        await self.placement.wait_released(session_id)
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
                reason=ErrorReason.NOT_PAIRING, session_id=session_id, state=state.value,
            )
        return QrView(session_id, actor.machine.qr, actor.qr_index, actor.qr_expires_at)

    async def request_pairing_code(self, session_id: str, phone_number: str) -> str:
        """An 8-character code to pair by phone number, asked of the upstream on the
        pairing session's link (of this instance: the code comes from the link)."""
        phone = validation.phone_number(phone_number)
        await self._record(session_id)
        actor = self.actors.get(session_id)
        link = actor.link if actor is not None and actor.state == State.PAIRING else None
        if actor is None or link is None:
            state = actor.state if actor else State.STOPPED
            why = (f"is {state.value}, not pairing: pairing codes are given while a session "
                   "is pairing (restart a logged-out session first)")
            if actor is None and (live := await self.store.get_live(session_id)) is not None:
                state = live.state
                why = (f"is owned by instance {live.owner!r} ({state.value}): ask that "
                       "instance, whose link gives the code")
            raise SessionNotReady(f"session {session_id!r} {why}", reason=ErrorReason.NOT_PAIRING,
                                  session_id=session_id, state=state.value)
        try:
            code = await link.request_pairing_code(phone)
        except PairingUnavailable as exc:
            raise PairingRefused(f"session {session_id!r}: no pairing code: {exc}",
                                 session_id=session_id) from None
        log.info("session %s: pairing code requested", session_id)
        return code

    # sending
    async def send(
        self,
        session_id: str,
        to: str,
        body: str,
        *,
        content: Content | None = None,
        idempotency_key: str = "",
        wait: bool = True,
        timeout: float | None = None,
        placed: Callable[[], None] | None = None,
    ) -> SendOutcome:
        """Queue a message and, with `wait`, wait up to `timeout` for its ack.
        `content`: media, a location, a reaction, a quote or mentions (None: `body`
        is a plain text message); stored with the message, durable like its body.
        `placed()` is called once the message's outbox position is fixed: what lets
        a many-Sends call keep each session's order (SendFlow)."""
        validation.session_id(session_id)
        validation.recipient(to)
        validation.content(body, content, max_body_bytes=self.settings.max_body_bytes,
                           max_media_bytes=self.settings.max_media_bytes)
        body, content = split_text(body, content)
        payload = None if content is None else encode_content(content)
        # No key given: one is made up for this call alone, which no retry can name
        # (32 random hex digits as uuid4().hex gave, for a fifth of its cost).
        retryable = bool(validation.idempotency_key(idempotency_key))
        key = idempotency_key if retryable else f"auto-{os.urandom(16).hex()}"
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

        # A many-Sends call's items come together (its `placed`): their write
        # need not linger for more, as a lone unary Send's may.
        accepted = await self._accept(session_id, record, actor, to, body, key, retryable,
                                      payload, placed or _nothing, linger=placed is None)
        message = accepted.message
        if accepted.result is not None or not wait:
            return _answered(SendOutcome(message, accepted.duplicate, accepted.result))
        result = await self._wait_ack(session_id, message, actor, timeout)
        if result is None:
            state = actor.state if actor else State.STOPPED
            raise NotDeliveredYet(
                f"message {message.message_id} is queued but the upstream has not acked it "
                f"yet (session {state.value}); retry with the same idempotency key",
                session_id=session_id, message_id=message.message_id, state=state.value,
                retry_after_s=1.0,
            )
        return _answered(SendOutcome(message, accepted.duplicate, result))

    def send_flow(self, guard: Guard | None = None) -> SendFlow:
        """A many-Sends call (SendStream): items in, outcomes out as they finish;
        `guard(session_id)` may refuse one item (say, a token's tenants)."""
        return SendFlow(self._send_item, guard=guard)

    async def send_many(
        self, items: Sequence[SendItem], guard: Guard | None = None
    ) -> list[SendOutcome | BrokerError]:
        """Every item's outcome, in item order (SendBatch)."""
        outcomes = await send_all(self._send_item, items, guard)
        return cast(list[SendOutcome | BrokerError], outcomes)

    async def _send_item(self, item: SendItem, placed: Callable[[], None]) -> SendOutcome:
        return await self.send(item.session_id, item.to, item.body, content=item.content,
                               idempotency_key=item.idempotency_key, wait=item.wait,
                               timeout=item.timeout, placed=placed)

    async def _accept(
        self, session_id: str, record: SessionRecord | None, actor: SessionActor | None,
        to: str, body: str, key: str, retryable: bool, content: bytes | None,
        placed: Callable[[], None], *, linger: bool = True,
    ) -> Accepted:
        """Queue the message, or find the one an earlier call queued under the key.

        The happy path is one store call (enqueue de-duplicates by key). The key
        is looked up first only where a refusal must not hide an earlier success:
        a session that cannot take messages now, and a rate limit that must not
        charge a retry of an accepted message. A key already used returns its
        message whatever this call's body or content: the key names the message.
        """
        try:
            await self._check_ready(session_id, record, actor)
        except SessionNotReady:
            known = await self.store.find_by_key(session_id, key) if retryable else None
            if known is None:
                raise
            return known
        if self.limiter.limits:
            known = await self.store.find_by_key(session_id, key) if retryable else None
            if known is not None:
                return known
            # Before enqueue: a message over the limit is never queued, so never sent.
            await admit(self.limiter, session_id)
        if actor is not None:
            # The actor's write batch takes the message before this call first
            # suspends: its place is fixed once placed() lets the next one go.
            placed()
            try:
                return await actor.enqueue(NewMessage(to, body, key, retryable, content),
                                           linger=linger)
            except NotOwner:
                pass  # the session has a newer owner: queue it as any instance would
        accepted = await self.store.enqueue(
            session_id, to, body, key, max_depth=self.settings.max_outbox, at=self.clock(),
            retryable=retryable, content=content,
        )
        placed()
        if accepted.result is None:
            # A retry of an unacked message kicks too: the kick after its first
            # acceptance may never have left (owners do not poll their outboxes).
            await self.placement.forward(Op.KICK, session_id)
        return accepted

    async def send_presence(
        self, session_id: str, chat: str, presence: Presence | None
    ) -> None:
        """Tell `chat` what the session is doing ("typing…"): best effort, never
        queued, sent only on the open link of the session's actor in this process,
        at most `presence_rate` a second per session."""
        validation.session_id(session_id)
        validation.recipient(chat, "chat")
        if presence is None:
            raise InvalidArgument("presence", "must be AVAILABLE, COMPOSING, RECORDING or PAUSED")
        actor = self.actors.get(session_id)
        if actor is None:
            await self._record(session_id)  # NOT_FOUND first
        link = actor.link if actor is not None and actor.state == State.OPEN else None
        if actor is None or link is None:
            state = actor.state if actor is not None else State.STOPPED
            where = f"is {state.value}"
            if actor is None and (live := await self.store.get_live(session_id)) is not None:
                state = live.state
                where = f"is owned by instance {live.owner!r} ({state.value})"
            raise PresenceNotSent(
                f"session {session_id!r} {where}: presence is sent only while the session is "
                "open on the answering instance (it is never queued); try again later",
                session_id=session_id, state=state.value, retry_after_s=1.0)
        wait = await self.presence_limiter.acquire(session_id)
        if wait > 0:
            raise RateLimited(
                f"session {session_id!r} is over its presence rate "
                f"({self.settings.presence_rate:g}/s); retry in {wait * 1000:.0f} ms",
                session_id=session_id, retry_after_s=wait + 1e-3)
        await link.send_presence(chat, presence)

    async def _check_ready(
        self, session_id: str, record: SessionRecord | None, actor: SessionActor | None
    ) -> None:
        why = ""
        if actor is not None:
            state, why = actor.state, actor.machine.reason
            if state not in NEEDS_A_PERSON and not actor.has_credentials:
                state = State.PAIRING
        elif record is None or not record.enabled or not self.placement.shared:
            state = State.STOPPED
        else:
            # Owned by another instance (or about to be claimed): judge by the
            # last state its owner recorded; STOPPED there means "between owners".
            last = await self.store.last_event(session_id)
            state = last.state if last else State.CONNECTING
            why = last.reason if last else ""
            if state == State.STOPPED:
                state = State.CONNECTING
        if state is State.FAILED and why.startswith(CREDENTIALS_UNREADABLE_PREFIX):
            raise SessionNotReady(
                f"session {session_id!r}: {why}", reason=ErrorReason.CREDENTIALS_UNREADABLE,
                session_id=session_id, state=state.value,
            )
        if state in _NOT_READY:
            reason, text = _NOT_READY[state]
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
        reason, text = _NOT_READY.get(actor.state, (ErrorReason.SESSION_STOPPED, "stopped"))
        raise SessionNotReady(
            f"session {session_id!r}: {text}; message {message.message_id} stays queued and "
            "is sent once the session is open again",
            reason=reason, session_id=session_id, message_id=message.message_id,
            state=actor.state.value,
        )

    # status and health
    def subscribe(self, session_ids: Collection[str], tenant: str | None) -> Subscription:
        return self.bus.subscribe(session_filter(session_ids, tenant))

    def watch(
        self, session_ids: Collection[str] = (), tenant: str = "", resume_after: str = ""
    ) -> AsyncGenerator[Watched, None]:
        """Status of the matching sessions (all, by default), for as long as it is read.

        First a snapshot of each session's current state or, given the last
        `event_id` a watcher saw, the events it missed since (a resync snapshot
        when the log no longer reaches back that far); then live events, each
        session's in sequence order and none twice. Raises SubscriberTooSlow when
        the reader falls too far behind (it can resume from its last event).
        """
        return watching.watch(self, session_ids, tenant, resume_after)

    async def health(self, session_ids: Collection[str] = (), tenant: str = "") -> list[HealthView]:
        for sid in session_ids:  # bad input first, then NOT_FOUND
            validation.session_id(sid, "session_ids")
        validation.optional_tenant(tenant)
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
                owner = self.placement.instance_id
                live_state, activity = actor.state, actor.last_activity
            else:
                live = await self.store.get_live(view.record.session_id)
                if live is not None and not self.placement.is_live(live.owner):
                    live = None  # its owner is gone; the report outlives it
                owner = live.owner if live else ""
                live_state = live.state if live else None
                activity = live.last_activity if live else 0.0
            out.append(HealthView(view, live_state, stats, recs, now,
                                  actor.machine.attempt if actor else 0, owner, activity,
                                  self.settings.engine or ""))
        return out


class _KeyedLock:
    """A lock per key, kept only while someone holds or waits for it: creates of
    one session id run one at a time (its actor must start once, under one fence),
    creates of different ids side by side."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]


def _answered(outcome: SendOutcome) -> SendOutcome:
    """The outcome a Send returns, or MessageRefused when the upstream refused it
    (a retry under the same key gets the same refusal: the message is settled)."""
    result = outcome.result
    if result is None or result.ok:
        return outcome
    message = outcome.message
    raise MessageRefused(
        f"the upstream refused message {message.message_id} (code {result.refused_code}: "
        f"{result.refused}); it is not resent",
        session_id=message.session_id, message_id=message.message_id,
        code=str(result.refused_code), upstream_reason=result.refused,
    )
