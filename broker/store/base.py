"""The store interface every backend implements, and the records it holds.

The runtime only talks to this interface, so the embedded memory store and
Redis are interchangeable; durability promises (README "What survives what") are the
backend's: `enqueue` returns only once the message is as durable as the
backend can make it.

Fencing (docs/reliability.md): every write a session's owner makes carries the
owner's fencing token as `fence`. The store refuses a write whose token is not
the session's current one by raising `NotOwner`, so a paused or partitioned
former owner can never write over its successor. `fence=None` marks a write
that is not an owner's (an admin call, or a Send accepted by any instance).
Tokens come from `new_fence` (alone) or the lease (scale-out); they only grow,
also across `delete_session`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from broker.errors import OutboxFull
from broker.lifecycle.states import State


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    tenant: str
    enabled: bool = True
    """Whether the session should be connected (False after Stop)."""
    created_at: float = 0.0


@dataclass(frozen=True)
class StatusEvent:
    session_id: str
    tenant: str
    sequence: int
    state: State
    previous: State
    reason: str = ""
    code: int = 0
    retry_in_s: float | None = None
    qr: str | None = None
    attempt: int = 0
    at: float = 0.0
    event_id: str = ""
    """Assigned by the store on append; ordered across sessions."""

    def with_id(self, event_id: str) -> StatusEvent:
        return replace(self, event_id=event_id)


@dataclass(frozen=True)
class OutboxMessage:
    session_id: str
    message_id: str
    to: str
    body: str
    idempotency_key: str
    sequence: int
    accepted_at: float
    content: bytes | None = None
    """The stored `broker.content` payload (media, location, ...); None: `body` is a
    plain text message. Read back with the message for delivery and `sent_message`;
    an idempotency replay (`find_by_key`, a duplicate Send) may leave it out."""


@dataclass(frozen=True)
class DeliveryResult:
    """The upstream's final answer about a message: its ack, or its refusal."""

    message_id: str
    acked_at: float
    """When the answer was recorded."""
    refused_code: int = 0
    """The upstream's code when it refused the message (WhatsApp e.g. 463), else 0."""
    refused: str = ""
    """Why the upstream refused the message; "" when it took it."""

    @property
    def ok(self) -> bool:
        """The upstream took the message (it was not refused)."""
        return not self.refused


@dataclass(frozen=True)
class Refusal:
    """The upstream will never take this message as it is: settle it as refused."""

    message_id: str
    code: int
    reason: str

    def result(self, at: float) -> DeliveryResult:
        return DeliveryResult(self.message_id, at, self.code, self.reason or "refused")


@dataclass(frozen=True)
class Accepted:
    message: OutboxMessage
    duplicate: bool
    result: DeliveryResult | None = None


@dataclass(frozen=True)
class NewMessage:
    """What a Send asks to queue."""

    to: str
    body: str
    idempotency_key: str
    retryable: bool = True
    """False: the broker made the key up (the client gave none), so no retry can
    name it and a store need not keep a de-duplication record for it (Redis keeps
    none; memory and SQLite hold the key as a column of the message anyway)."""
    content: bytes | None = None
    """The encoded `broker.content.Content`, kept with the message, durable like its
    body; None for plain text."""


@dataclass(frozen=True)
class OutboxBatch:
    """Outbox changes written together: acks and refusals first, then new messages.

    A refusal settles its message like an ack (it leaves the outbox and is never
    sent again) but its result says why the upstream refused it.

    With `claim`, the new messages are also read for delivery by the caller (as
    `pending` would read them), so the session's owner gets them without a
    second round trip. Claim only when nothing older is left unread: reading is
    in order, so older unread messages would be handed out first.
    """

    acks: Sequence[str] = ()
    messages: Sequence[NewMessage] = ()
    claim: bool = False
    refusals: Sequence[Refusal] = ()


@dataclass(frozen=True)
class OutboxBatchResult:
    acked: list[DeliveryResult]
    """Per ack, then per refusal, in order: the result now stored (an earlier
    one if the message was already settled)."""
    accepted: list[Accepted | OutboxFull]
    """Per new message, in order; one that did not fit gets its OutboxFull."""
    claimed: list[OutboxMessage] = field(default_factory=list)
    """Read for the caller to deliver, in order (with `claim`)."""
    unread: bool = False
    """With `claim`: messages are left that the caller has not read."""


@dataclass(frozen=True)
class LiveState:
    """What the owning instance last reported about a session; expires with a TTL
    so a dead owner's report does not outlive it."""

    state: State
    owner: str
    last_activity: float
    reported_at: float


@dataclass
class EventPage:
    events: list[StatusEvent] = field(default_factory=list)
    gap: bool = False
    """The cursor is older than what the log retains: the caller must resync."""


@dataclass(frozen=True)
class InboundOrigin:
    """Who sent an inbound message and where, as far as the upstream says (Baileys
    reports all of it; the simulator none)."""

    sender_lid: str = ""
    """The sender's LID (``...@lid``), WhatsApp's privacy id, where reported."""
    push_name: str = ""
    """The name the sender set for themselves."""
    chat: str = ""
    """The chat's JID: the sender's in a 1:1 chat, the group's (``...@g.us``) in a group."""
    sent_at: float = 0.0
    """When the sender sent it, by the upstream's clock (0: not reported)."""

    def to_json(self) -> str:
        """The stored form (SQLite and Redis): only the fields that are set; "" if none."""
        if not (self.sender_lid or self.push_name or self.chat or self.sent_at):
            return ""  # most entries (every status update): no dict, no JSON
        data = {"sender_lid": self.sender_lid, "push_name": self.push_name,
                "chat": self.chat, "sent_at": self.sent_at}
        return json.dumps({k: v for k, v in data.items() if v}, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> InboundOrigin:
        if not raw:
            return NO_ORIGIN
        data = json.loads(raw)
        return cls(**{k: data[k] for k in ("sender_lid", "push_name", "chat", "sent_at")
                      if k in data})


NO_ORIGIN = InboundOrigin()


@dataclass(frozen=True)
class InboundRecord:
    """A message the upstream delivered to a session, as stored (before the upstream ack)."""

    session_id: str
    inbound_id: str
    """The store's id ("<ms>-<n>", ordered within the session); workers ack by it."""
    upstream_id: str
    sender: str
    body: str
    received_at: float
    origin: InboundOrigin = NO_ORIGIN
    content: bytes | None = None
    """Beyond text: broker.content's stored payload (a medium's metadata only; its
    bytes are kept apart, `Store.inbound_media`); None: `body` is the text."""


INBOUND = "inbound"
"""The topic of messages the upstream delivered (Receive)."""
UPDATES = "updates"
"""The topic of per-message status updates (ReceiveUpdates; `broker.runtime.updates`
says how an update is written as an entry)."""
TOPICS = (INBOUND, UPDATES)


class NewEntry(NamedTuple):
    """What `add_entries` appends: a topic entry before the store numbered it."""

    upstream_id: str
    """The de-dup key: an entry under a key already stored is dropped."""
    sender: str
    body: str
    origin: InboundOrigin = NO_ORIGIN
    content: bytes | None = None
    media: bytes | None = None
    """A medium's bytes, kept with the entry (same retention) and read back with
    `inbound_media`; never handed out with the entry itself."""


@dataclass(frozen=True)
class InboundDelivery:
    """One hand-out of an inbound message to a consumer of a group."""

    record: InboundRecord
    delivery_count: int
    """1 on the first delivery to the group; grows on every redelivery."""


def new_message_id() -> str:
    """A fresh, unguessable message id ("m-" and 32 hex digits, as uuid4().hex gave).

    os.urandom directly: uuid.uuid4() costs about 3 us here, 6% of the broker's
    CPU in the 100-session SendStream profile (docs/benchmarks.md)."""
    return f"m-{os.urandom(16).hex()}"


def outbox_full(session_id: str, depth: int | str) -> OutboxFull:
    """The refusal of a Send to an outbox holding `depth` undelivered messages."""
    return OutboxFull(f"outbox of {session_id!r} holds {depth} undelivered messages",
                      session_id=session_id, retry_after_s=1.0)


def event_to_json(event: StatusEvent) -> str:
    """The stored form of a status event (SQLite and Redis keep the same JSON)."""
    return json.dumps(asdict(event), separators=(",", ":"))


def event_from_json(raw: bytes | str, event_id: str | None = None) -> StatusEvent:
    data = json.loads(raw)
    data["state"] = State(data["state"])
    data["previous"] = State(data["previous"])
    if event_id is not None:
        data["event_id"] = event_id
    return StatusEvent(**data)


def event_order(event_id: str) -> tuple[int, int]:
    """Sort key of an event id ("<ms>-<n>", the Redis stream id format)."""
    head, _, tail = event_id.partition("-")
    try:
        return int(head), int(tail or 0)
    except ValueError:
        return (-1, -1)


class Store(Protocol):
    # sessions
    async def create_session(self, record: SessionRecord) -> tuple[SessionRecord, bool]:
        """Insert if absent; returns (stored record, created)."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...
    async def list_sessions(self, tenant: str | None = None) -> list[SessionRecord]: ...
    async def set_enabled(self, session_id: str, enabled: bool) -> None: ...
    async def delete_session(self, session_id: str) -> None:
        """Remove the session and its data. Its fencing counter survives (and grows),
        so a re-created session's owner never reuses a token."""
        ...

    # fencing
    async def new_fence(self, session_id: str) -> int:
        """Grant a new fencing token for the session, greater than every earlier one:
        from now on owner writes carrying an older token raise NotOwner."""
        ...

    # credentials (opaque upstream credentials; never logged)
    async def save_credentials(
        self, session_id: str, credentials: dict[str, Any], *, fence: int | None = None
    ) -> None: ...
    async def load_credentials(self, session_id: str) -> dict[str, Any] | None: ...
    async def clear_credentials(self, session_id: str, *, fence: int | None = None) -> None: ...
    async def has_credentials(self, session_id: str) -> bool:
        """Whether credentials are stored, without reading (decrypting) them."""
        ...

    # per-session key-value area (an engine's auth state, e.g. Baileys' creds and
    # signal keys). Values are opaque bytes, sealed per value on disk and in Redis
    # (broker.store.crypto `seal_value`: the session id and the key name are the
    # associated data) and never logged. Wiped by delete_session.
    async def kv_get(self, session_id: str, keys: Sequence[str]) -> dict[str, bytes]:
        """The stored values of `keys`; keys that are not stored are absent."""
        ...

    async def kv_set(
        self, session_id: str, values: Mapping[str, bytes | None], *, fence: int | None = None
    ) -> None:
        """Store every value (None deletes its key) in one atomic write; with a stale
        `fence` nothing is written (NotOwner)."""
        ...

    async def kv_clear(self, session_id: str, *, fence: int | None = None) -> None:
        """Delete every key of the session's area (refused when fenced)."""
        ...

    # outbox
    async def enqueue(
        self, session_id: str, to: str, body: str, idempotency_key: str, *, max_depth: int,
        at: float, retryable: bool = True, content: bytes | None = None,
    ) -> Accepted:
        """Durably queue a message, or return the one already queued under the key
        (whatever its body or content: the key names the message; `retryable`: see
        NewMessage).

        Raises OutboxFull when the outbox holds max_depth messages.
        """
        ...

    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        """Apply a batch of acks and new messages in one atomic write (see OutboxBatch).

        With a stale `fence` nothing of the batch is written (NotOwner)."""
        ...

    async def find_by_key(self, session_id: str, idempotency_key: str) -> Accepted | None:
        """The message an earlier Send queued under this key, if any."""
        ...

    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        """Become the outbox's reader: take over what a previous owner read but never
        acked. Returns how many read-but-unacked messages this reader now holds."""
        ...

    async def pending(
        self, session_id: str, limit: int, after_sequence: int = 0, *, fence: int | None = None
    ) -> list[OutboxMessage]:
        """Of the `limit` oldest unacked messages, in order, those numbered after
        `after_sequence` (the delivery loop already holds the others). Messages a
        previous reader took and never acked are taken over first, on every call,
        so none is stranded with a former owner."""
        ...

    async def result(self, session_id: str, message_id: str) -> DeliveryResult | None: ...
    async def sent_message(self, session_id: str, message_id: str) -> OutboxMessage | None:
        """The message queued under this id: while unacked, and after its ack for the
        store's sent-message retention (`sent_retention_s`, the idempotency record's
        lifetime), so an engine can answer a recipient's retry request (Baileys'
        `getMessage`) with the original text."""
        ...

    async def wait_result(
        self, session_id: str, message_id: str, timeout: float
    ) -> DeliveryResult | None: ...
    async def outbox_depth(self, session_id: str) -> int: ...
    async def wait_outbox(self, session_id: str, timeout: float) -> None:
        """Return when a message may have been queued (or after timeout)."""
        ...

    # live state (reported by the owner, expires after ttl_s)
    async def report_live(
        self, session_id: str, live: LiveState, ttl_s: float, *, fence: int | None = None
    ) -> None: ...
    async def get_live(self, session_id: str) -> LiveState | None: ...

    # status events
    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        """Log the event and make it the session's last one (refused when fenced)."""
        ...
    async def last_event(self, session_id: str) -> StatusEvent | None: ...
    async def events_after(self, event_id: str, limit: int) -> EventPage: ...
    async def close(self) -> None: ...

    # ---- inbound and updates ---------------------------------------------------
    # Per session and topic (INBOUND: messages the upstream delivered; UPDATES:
    # status updates of sent messages), an append-only stream read by consumer
    # groups (Redis Streams semantics; the memory store mimics them), trimmed by
    # the inbound retention. At-least-once: a delivery stays pending for its
    # consumer until acked and is claimed by another reader of the group once
    # idle for the store's `redeliver_after_s`.

    async def add_inbound(
        self, session_id: str, upstream_id: str, sender: str, body: str, at: float, *,
        fence: int | None = None, origin: InboundOrigin = NO_ORIGIN, topic: str = INBOUND,
        content: bytes | None = None, media: bytes | None = None,
    ) -> InboundRecord | None:
        """Durably append; None if this upstream id is already stored (the upstream
        re-sends until acked, so the same message arrives again after a lost ack).
        `media`, a medium's bytes, is written in the same step, so an entry is never
        kept without the bytes it came with."""
        ...

    async def inbound_media(self, session_id: str, upstream_id: str) -> bytes | None:
        """The medium's bytes kept with an INBOUND entry (None: not kept: no such
        entry, one without a medium, or past the retention)."""
        ...

    async def add_entries(
        self, session_id: str, entries: Sequence[NewEntry], at: float, *, topic: str,
        fence: int | None = None,
    ) -> list[InboundRecord | None]:
        """`add_inbound` for many entries in one write (per entry its record, or None
        for a duplicate); with a stale `fence` nothing is written (NotOwner)."""
        ...

    async def find_inbound(
        self, session_id: str, upstream_ids: Sequence[str], *, topic: str = INBOUND
    ) -> dict[str, InboundRecord]:
        """The stored entries of those upstream ids that are still kept."""
        ...

    async def read_inbound(
        self, session_id: str, group: str, consumer: str, count: int, block_s: float, *,
        topic: str = INBOUND,
    ) -> list[InboundDelivery]:
        """Up to `count` deliveries for `consumer`: idle pending messages of the group
        claimed first (delivery_count grows), then new ones; waits up to `block_s` for
        new ones when there is nothing. The group is created on first use at the
        start of the stream, so nothing stored before its first reader is lost."""
        ...

    async def ack_inbound(
        self, session_id: str, group: str, inbound_ids: list[str], *, topic: str = INBOUND
    ) -> int:
        """Settle deliveries of the group; returns how many were pending."""
        ...

    async def release_inbound_consumer(
        self, session_id: str, group: str, consumer: str, *, topic: str = INBOUND
    ) -> None:
        """A reader is done (its Receive call ended): forget `consumer` unless it still
        holds deliveries, which stay claimable by the group. Stores that keep no record
        of consumers have nothing to do."""
        ...


class OneAtATime:
    """The single-message `enqueue`, written once over `apply_outbox`."""

    async def apply_outbox(
        self, session_id: str, batch: OutboxBatch, *, max_depth: int, at: float,
        fence: int | None = None,
    ) -> OutboxBatchResult:
        raise NotImplementedError

    async def enqueue(
        self, session_id: str, to: str, body: str, idempotency_key: str, *, max_depth: int,
        at: float, retryable: bool = True, content: bytes | None = None,
    ) -> Accepted:
        batch = OutboxBatch(messages=[NewMessage(to, body, idempotency_key, retryable,
                                                 content)])
        [outcome] = (await self.apply_outbox(session_id, batch, max_depth=max_depth,
                                             at=at)).accepted
        if isinstance(outcome, OutboxFull):
            raise outcome
        return outcome
