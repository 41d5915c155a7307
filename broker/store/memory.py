"""The embedded default store: everything in this process, nothing to install.

Durable for the life of the process only; Redis is the store once state must
survive restarts or be shared by several broker instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from broker.errors import NotOwner, OutboxFull
from broker.store.base import (
    INBOUND,
    NO_ORIGIN,
    TOPICS,
    Accepted,
    DeliveryResult,
    EventPage,
    InboundDelivery,
    InboundOrigin,
    InboundRecord,
    LiveState,
    NewEntry,
    NewMessage,
    OneAtATime,
    OutboxBatch,
    OutboxBatchResult,
    OutboxMessage,
    SessionRecord,
    StatusEvent,
    event_order,
    new_message_id,
    outbox_full,
)
from broker.store.local import AckWaiters, LiveStates

_Kept = tuple[str, str, str, int, float, bytes | None]
"""A message remembered for its idempotency key: (to, body, key, sequence, accepted_at,
content).

Up to `results_kept` of these live per session. As tuples of strings and numbers
(and results as plain floats) the cyclic GC stops tracking them; as dataclass
instances they were up to hundreds of thousands of objects for every full
collection to walk."""


class _Outbox:
    def __init__(self) -> None:
        self.messages: OrderedDict[str, OutboxMessage] = OrderedDict()
        self.by_key: dict[str, str] = {}
        self.results: dict[str, float | DeliveryResult] = {}
        """Settled message id -> acked at (a float: no object per ack), or the
        result of a refused one."""
        self.waiters: AckWaiters[str] = AckWaiters()
        self.sequence = itertools.count(1)
        self.read_upto = 0
        """The highest sequence handed to the reader (what Redis's consumer group tracks)."""
        self.changed = asyncio.Event()
        # Ordered by acceptance and trimmed from the front: an OrderedDict, since
        # finding a plain dict's first key after many front deletions scans every
        # deleted slot (20% of the broker's CPU under Send c=64, docs/benchmarks.md).
        self.known: OrderedDict[str, _Kept] = OrderedDict()


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    """time.monotonic() of the latest delivery (the idle clock)."""
    count: int


@dataclass
class _Group:
    next_index: int = 0
    """Position in the stream of the first message never delivered to the group."""
    pending: dict[str, _Pending] = field(default_factory=dict)
    """inbound id -> delivery, in first-delivery (stream) order."""


_Row = tuple[str, str, str, str, str, float, str, bytes | None]
"""A stored inbound or update entry: an InboundRecord's fields with the origin as its
JSON. A tuple of strings and a float is not tracked by the cyclic GC, and every
sent message adds status updates (see `_Kept` for what tracked objects cost)."""


def _row(record: InboundRecord) -> _Row:
    return (record.session_id, record.inbound_id, record.upstream_id, record.sender,
            record.body, record.received_at, record.origin.to_json(), record.content)


def _record(row: _Row) -> InboundRecord:
    sid, iid, uid, sender, body, at, origin, content = row
    return InboundRecord(sid, iid, uid, sender, body, at, InboundOrigin.from_json(origin),
                         content)


@dataclass
class _InboundLog:
    records: deque[_Row] = field(default_factory=deque)
    """In arrival order; the retention trims from the left."""
    by_id: dict[str, _Row] = field(default_factory=dict)
    by_upstream: dict[str, str] = field(default_factory=dict)
    """upstream id -> inbound id (the de-dup set, and `find_inbound`)."""
    media: dict[str, bytes] = field(default_factory=dict)
    """upstream id -> the bytes of the medium that came with it."""
    groups: dict[str, _Group] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (and replaced) on every append: wakes every blocked reader once."""


def _drop_oldest(log: _InboundLog, count: int) -> None:
    """Forget the `count` oldest entries with their de-dup entries and media; groups
    move past them."""
    for _ in range(count):
        _, inbound_id, upstream_id, *_ = log.records.popleft()  # no record rebuilt per row
        del log.by_id[inbound_id]
        log.by_upstream.pop(upstream_id, None)
        log.media.pop(upstream_id, None)
    for group in log.groups.values():
        group.next_index = max(0, group.next_index - count)


def _trim_inbound(log: _InboundLog, cutoff: float) -> None:
    """Forget messages received before `cutoff`, acked or not, as the Redis store's
    XTRIM MINID does: groups move past them and their de-dup entries go."""
    trimmed = 0
    for row in log.records:  # iterated, not indexed: a deque's middle is a walk away
        if row[5] >= cutoff:
            break
        trimmed += 1
    if trimmed:
        _drop_oldest(log, trimmed)
        for group in log.groups.values():
            for inbound_id in [i for i in group.pending if i not in log.by_id]:
                del group.pending[inbound_id]


def _cap_inbound(log: _InboundLog, kept: int) -> None:
    """Forget the oldest entries past the newest `kept`, but none that a worker group
    has still to read or to ack: the count bounds what nobody waits for (every sent
    message adds status updates, which no one may ever read), the groups' backlogs
    stay whole."""
    groups = log.groups.values()
    trimmed = 0
    for row in itertools.islice(log.records, max(0, len(log.records) - kept)):
        if any(g.next_index <= trimmed or row[1] in g.pending for g in groups):
            break
        trimmed += 1
    if trimmed:
        _drop_oldest(log, trimmed)


def _result(box: _Outbox, message_id: str) -> DeliveryResult | None:
    done = box.results.get(message_id)
    if done is None or isinstance(done, DeliveryResult):
        return done
    return DeliveryResult(message_id, done)


class MemoryStore(OneAtATime):
    def __init__(
        self, *, event_log_size: int = 10_000, results_kept: int = 100_000,
        inbound_redeliver_after_s: float = 30.0, inbound_retention_s: float | None = None,
        entries_kept: int = 100_000,
    ) -> None:
        """`results_kept`: sent messages remembered per session (idempotency keys,
        results); `entries_kept`: inbound messages and status updates kept per session
        and topic past what worker groups still have to read or ack. Both bound the
        process's memory however long it runs (the retention alone let every sent
        message's status updates pile up for days)."""
        self._sessions: dict[str, SessionRecord] = {}
        self._credentials: dict[str, dict[str, Any]] = {}
        self._kv: dict[str, dict[str, bytes]] = {}
        """Per session, the key-value area (in this process only, so not sealed)."""
        self._outboxes: dict[str, _Outbox] = {}
        self._events: deque[StatusEvent] = deque(maxlen=event_log_size)
        self._last: dict[str, StatusEvent] = {}
        self._event_counter = itertools.count(1)
        self._dropped_events = False
        self._results_kept = results_kept
        self._live = LiveStates()
        self._inbound: dict[tuple[str, str], _InboundLog] = {}
        """(topic, session id) -> its log."""
        self._inbound_ids = itertools.count(1)
        self._redeliver_after_s = inbound_redeliver_after_s
        self._inbound_retention_s = inbound_retention_s or None
        self._entries_kept = entries_kept
        self._fences: dict[str, int] = {}
        #: one counter for all sessions, so a re-created session never reuses a token
        self._fence_counter = itertools.count(1)

    # sessions
    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        existing = self._sessions.get(record.session_id)
        if existing is not None:
            return existing, False
        self._sessions[record.session_id] = record
        return record, True

    async def get_session(self, session_id: str) -> SessionRecord | None:
        return self._sessions.get(session_id)

    async def list_sessions(self, tenant: str | None = None) -> list[SessionRecord]:
        return [
            r for r in sorted(self._sessions.values(), key=lambda r: r.session_id)
            if tenant is None or r.tenant == tenant
        ]

    async def set_enabled(self, session_id: str, enabled: bool) -> None:
        record = self._sessions.get(session_id)
        if record is not None:
            self._sessions[session_id] = replace(record, enabled=enabled)

    async def delete_session(self, session_id: str) -> None:
        if session_id in self._fences:  # a former owner's late writes are refused
            self._fences[session_id] = next(self._fence_counter)
        self._sessions.pop(session_id, None)
        self._credentials.pop(session_id, None)
        self._kv.pop(session_id, None)
        self._outboxes.pop(session_id, None)
        self._last.pop(session_id, None)
        for topic in TOPICS:
            self._inbound.pop((topic, session_id), None)

    # fencing
    async def new_fence(self, session_id: str) -> int:
        token = self._fences[session_id] = next(self._fence_counter)
        return token

    def _check(self, session_id: str, fence: int | None) -> None:
        if fence is not None and self._fences.get(session_id) != fence:
            raise NotOwner(
                f"session {session_id!r}: fencing token {fence} is stale; another owner "
                "holds the session", session_id=session_id,
            )

    # credentials
    async def save_credentials(
        self, session_id: str, credentials: dict[str, Any], *, fence: int | None = None
    ) -> None:
        self._check(session_id, fence)
        self._credentials[session_id] = dict(credentials)

    async def load_credentials(self, session_id: str) -> dict[str, Any] | None:
        creds = self._credentials.get(session_id)
        return dict(creds) if creds is not None else None

    async def has_credentials(self, session_id: str) -> bool:
        return session_id in self._credentials

    async def clear_credentials(self, session_id: str, *, fence: int | None = None) -> None:
        self._check(session_id, fence)
        self._credentials.pop(session_id, None)

    # key-value area
    async def kv_get(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        area = self._kv.get(session_id, {})
        return {k: area[k] for k in keys if k in area}

    async def kv_set(
        self, session_id: str, values: Mapping[str, bytes | None], *, fence: int | None = None
    ) -> None:
        self._check(session_id, fence)
        area = self._kv.setdefault(session_id, {})
        for name, value in values.items():
            if value is None:
                area.pop(name, None)
            else:
                area[name] = bytes(value)
        if not area:
            del self._kv[session_id]

    async def kv_clear(self, session_id: str, *, fence: int | None = None) -> None:
        self._check(session_id, fence)
        self._kv.pop(session_id, None)

    # outbox
    def _outbox(self, session_id: str) -> _Outbox:
        box = self._outboxes.get(session_id)
        if box is None:
            box = self._outboxes[session_id] = _Outbox()
        return box

    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        self._check(session_id, fence)
        box = self._outbox(session_id)
        acked = [self._settle(box, DeliveryResult(mid, at)) for mid in batch.acks]
        acked += [self._settle(box, refusal.result(at)) for refusal in batch.refusals]
        accepted = [self._enqueue(box, session_id, m, max_depth, at) for m in batch.messages]
        fresh = sum(1 for o in accepted if isinstance(o, Accepted) and not o.duplicate)
        if fresh:
            box.changed.set()
        claimed: list[OutboxMessage] = []
        unread = False
        if batch.claim and fresh:
            unsent = (m for m in box.messages.values() if m.sequence > box.read_upto)
            claimed = list(itertools.islice(unsent, fresh))
            if claimed:
                box.read_upto = claimed[-1].sequence
            newest = next(reversed(box.messages.values()), None)
            unread = newest is not None and newest.sequence > box.read_upto
        return OutboxBatchResult(acked, accepted, claimed, unread)

    def _enqueue(
        self, box: _Outbox, session_id: str, new: NewMessage, max_depth: int, at: float
    ) -> Accepted | OutboxFull:
        known_id = box.by_key.get(new.idempotency_key)
        if known_id is not None:
            return self._known(box, session_id, known_id)
        if len(box.messages) >= max_depth:
            return outbox_full(session_id, len(box.messages))
        message = OutboxMessage(
            session_id=session_id, message_id=new_message_id(), to=new.to,
            body=new.body, idempotency_key=new.idempotency_key, sequence=next(box.sequence),
            accepted_at=at, content=new.content,
        )
        box.messages[message.message_id] = message
        box.known[message.message_id] = (new.to, new.body, new.idempotency_key,
                                          message.sequence, at, new.content)
        box.by_key[new.idempotency_key] = message.message_id
        self._trim(box)
        return Accepted(message, False)

    async def find_by_key(self, session_id: str, idempotency_key: str) -> Accepted | None:
        box = self._outboxes.get(session_id)
        if box is None or idempotency_key not in box.by_key:
            return None
        return self._known(box, session_id, box.by_key[idempotency_key])

    @staticmethod
    def _known(box: _Outbox, session_id: str, message_id: str) -> Accepted:
        """The answer to a Send whose key is already known: its message and any result."""
        to, body, key, sequence, accepted_at, content = box.known[message_id]
        message = OutboxMessage(session_id=session_id, message_id=message_id, to=to, body=body,
                                idempotency_key=key, sequence=sequence, accepted_at=accepted_at,
                                content=content)
        return Accepted(message, True, _result(box, message_id))

    def _trim(self, box: _Outbox) -> None:
        """Forget the oldest delivered messages' keys once past the retention count."""
        while len(box.known) > self._results_kept:
            oldest_id = next(iter(box.known))
            if oldest_id in box.messages:
                break
            old = box.known.pop(oldest_id)
            box.by_key.pop(old[2], None)
            box.results.pop(oldest_id, None)

    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        self._check(session_id, fence)
        return 0  # one process: there is no other reader to take over from

    async def pending(
        self, session_id: str, limit: int, after_sequence: int = 0, *, fence: int | None = None
    ) -> list[OutboxMessage]:
        self._check(session_id, fence)
        box = self._outbox(session_id)
        window = itertools.islice(box.messages.values(), limit)
        out = [m for m in window if m.sequence > after_sequence]
        if out:
            box.read_upto = max(box.read_upto, out[-1].sequence)
        return out

    @staticmethod
    def _settle(box: _Outbox, result: DeliveryResult) -> DeliveryResult:
        message_id = result.message_id
        existing = _result(box, message_id)
        if existing is not None:
            return existing
        box.messages.pop(message_id, None)
        if message_id in box.known:
            box.results[message_id] = result.acked_at if result.ok else result
        box.waiters.resolve(message_id, result)
        return result

    async def result(self, session_id: str, message_id: str) -> DeliveryResult | None:
        return _result(self._outbox(session_id), message_id)

    async def sent_message(self, session_id: str, message_id: str) -> OutboxMessage | None:
        """Kept as long as its idempotency record: the newest `results_kept` per session."""
        box = self._outboxes.get(session_id)
        if box is None or message_id not in box.known:
            return None
        return self._known(box, session_id, message_id).message

    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None:
        box = self._outbox(session_id)
        done = _result(box, message_id)
        if done is not None or timeout <= 0:
            return done
        return await box.waiters.wait(message_id, timeout)

    async def outbox_depth(self, session_id: str) -> int:
        box = self._outboxes.get(session_id)
        return len(box.messages) if box else 0

    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        box = self._outbox(session_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await box.changed.wait()
        box.changed.clear()

    # live state
    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None:
        self._check(session_id, fence)
        self._live.report(session_id, live, ttl_s)

    async def get_live(self, session_id: str) -> LiveState | None:
        return self._live.get(session_id)

    # events
    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        self._check(event.session_id, fence)
        if self._events.maxlen is not None and len(self._events) == self._events.maxlen:
            self._dropped_events = True
        stored = event.with_id(f"{next(self._event_counter)}-0")
        self._events.append(stored)
        self._last[event.session_id] = stored
        return stored

    async def last_event(self, session_id: str) -> StatusEvent | None:
        return self._last.get(session_id)

    async def events_after(self, event_id: str, limit: int) -> EventPage:
        cursor = event_order(event_id)
        if cursor < (0, 0):
            return EventPage(gap=True)
        if self._events and self._dropped_events and cursor < event_order(self._events[0].event_id):
            oldest = event_order(self._events[0].event_id)
            if (cursor[0] + 1, 0) < oldest:
                return EventPage(gap=True)
        out = [e for e in self._events if event_order(e.event_id) > cursor]
        return EventPage(out[:limit])

    async def close(self) -> None:
        return None

    # inbound
    def _inbound_log(self, session_id: str, topic: str) -> _InboundLog:
        log = self._inbound.get((topic, session_id))
        if log is None:
            log = self._inbound[(topic, session_id)] = _InboundLog()
        return log

    async def add_inbound(
        self, session_id: str, upstream_id: str, sender: str, body: str, at: float, *,
        fence: int | None = None, origin: InboundOrigin = NO_ORIGIN, topic: str = INBOUND,
        content: bytes | None = None, media: bytes | None = None,
    ) -> InboundRecord | None:
        self._check(session_id, fence)
        return self._add_entry(
            session_id, NewEntry(upstream_id, sender, body, origin, content, media), at, topic)

    async def inbound_media(self, session_id: str, upstream_id: str) -> bytes | None:
        log = self._inbound.get((INBOUND, session_id))
        return None if log is None else log.media.get(upstream_id)

    async def add_entries(
        self, session_id: str, entries: Sequence[NewEntry], at: float, *, topic: str,
        fence: int | None = None,
    ) -> list[InboundRecord | None]:
        self._check(session_id, fence)
        return self._add_entries(session_id, entries, at, topic)

    async def find_inbound(
        self, session_id: str, upstream_ids: Sequence[str], *, topic: str = INBOUND
    ) -> dict[str, InboundRecord]:
        log = self._inbound.get((topic, session_id))
        if log is None:
            return {}
        found = ((uid, log.by_upstream.get(uid)) for uid in upstream_ids)
        return {uid: _record(log.by_id[iid]) for uid, iid in found if iid in log.by_id}

    def _add_entry(
        self, session_id: str, entry: NewEntry, at: float, topic: str
    ) -> InboundRecord | None:
        return self._add_entries(session_id, (entry,), at, topic)[0]

    def _add_entries(
        self, session_id: str, entries: Sequence[NewEntry], at: float, topic: str
    ) -> list[InboundRecord | None]:
        """Append what is new (None for an upstream id already kept), then trim and
        wake the readers once for the whole batch: every acked message adds one."""
        log = self._inbound_log(session_id, topic)
        out: list[InboundRecord | None] = []
        for upstream_id, sender, body, origin, content, media in entries:
            if upstream_id in log.by_upstream:
                out.append(None)
                continue
            record = InboundRecord(
                session_id=session_id, inbound_id=f"{next(self._inbound_ids)}-0",
                upstream_id=upstream_id, sender=sender, body=body, received_at=at,
                origin=origin, content=content,
            )
            if media is not None:
                log.media[upstream_id] = media
            row = _row(record)
            log.records.append(row)
            log.by_id[record.inbound_id] = row
            log.by_upstream[upstream_id] = record.inbound_id
            out.append(record)
        if len(out) > out.count(None):
            if self._inbound_retention_s:
                _trim_inbound(log, at - self._inbound_retention_s)
            if len(log.records) > self._entries_kept:
                _cap_inbound(log, self._entries_kept)
            log.changed.set()
            log.changed = asyncio.Event()
        return out

    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float, *,
        topic: str = INBOUND,
    ) -> list[InboundDelivery]:
        """XAUTOCLAIM then XREADGROUP, in-process; nothing is taken until the wait is over,
        so a reader cancelled while blocked leaves every message for the others."""
        if count <= 0:
            return []
        log = self._inbound_log(session_id, topic)
        state = log.groups.setdefault(group, _Group())
        out = self._claim_inbound(log, state, consumer, count)
        if not out and state.next_index >= len(log.records) and block_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(block_s):
                    await log.changed.wait()
            if self._inbound.get((topic, session_id)) is not log:
                return []  # the session was deleted meanwhile
        now = time.monotonic()
        while len(out) < count and state.next_index < len(log.records):
            record = _record(log.records[state.next_index])
            state.next_index += 1
            state.pending[record.inbound_id] = _Pending(consumer, now, 1)
            out.append(InboundDelivery(record, 1))
        return out

    def _claim_inbound(
        self, log: _InboundLog, state: _Group, consumer: str, count: int
    ) -> list[InboundDelivery]:
        now = time.monotonic()
        out: list[InboundDelivery] = []
        for inbound_id, pending in state.pending.items():
            if len(out) >= count:
                break
            if now - pending.delivered_at >= self._redeliver_after_s:
                pending.consumer, pending.delivered_at = consumer, now
                pending.count += 1
                out.append(InboundDelivery(_record(log.by_id[inbound_id]), pending.count))
        return out

    async def release_inbound_consumer(
        self, session_id: str, group: str, consumer: str, *, topic: str = INBOUND
    ) -> None:
        """Consumers exist here only as names on pending deliveries: nothing to forget."""

    async def ack_inbound(
        self, session_id: str, group: str, inbound_ids: list[str], *, topic: str = INBOUND
    ) -> int:
        log = self._inbound.get((topic, session_id))
        state = log.groups.get(group) if log is not None else None
        if state is None:
            return 0
        return sum(state.pending.pop(i, None) is not None for i in set(inbound_ids))
