"""Per-message status updates: what the upstream said about a sent message (its
server ack, delivered, read and played receipts, or a refusal), as entries of
the store's UPDATES topic, read by workers with acknowledgement (ReceiveUpdates,
AckUpdates: the consumer groups and redelivery of inbound messages) and looked
up by message (GetMessage).

An update is stored as a topic entry keyed "<message id>:<status>", so each
status of a message is stored once however often the upstream repeats it (a
resend after a lost ack is acked again); `sender` holds the message id and
`body` "<status>[ <code> <reason>]". This module is the only one that knows
that encoding.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from broker import validation
from broker.config import Settings
from broker.errors import InvalidArgument, MessageNotFound, SessionNotFound
from broker.runtime.inbound import InboundService
from broker.store.base import (
    UPDATES,
    InboundDelivery,
    InboundRecord,
    NewEntry,
    OutboxMessage,
    Store,
)


class MessageStatus(enum.IntEnum):
    """How far a message got, in order (the proto's MessageStatus numbers)."""

    QUEUED = 1
    SERVER_ACK = 2
    DELIVERED = 3
    READ = 4
    PLAYED = 5
    REFUSED = 6

    @property
    def final(self) -> bool:
        """A refusal ends the message's story; receipts only ever move it forward."""
        return self is MessageStatus.REFUSED


RECEIPTS = {"delivered": MessageStatus.DELIVERED, "read": MessageStatus.READ,
            "played": MessageStatus.PLAYED}
"""Receipt names as providers report them (protocol v1's `status`, the bridge's)."""


@dataclass(frozen=True)
class MessageUpdate:
    session_id: str
    message_id: str
    status: MessageStatus
    at: float
    code: int = 0
    reason: str = ""
    update_id: str = ""
    """The store's id of the update; workers ack by it (empty before it is stored)."""


@dataclass(frozen=True)
class MessageInfo:
    """GetMessage's answer: how far the message got, and what was sent if still kept."""

    session_id: str
    message_id: str
    status: MessageStatus
    status_at: float
    code: int = 0
    reason: str = ""
    sent: OutboxMessage | None = None


@dataclass(frozen=True)
class UpdateDelivery:
    update: MessageUpdate
    delivery_count: int


def entry(message_id: str, status: MessageStatus, code: int = 0, reason: str = "") -> NewEntry:
    """The topic entry of one update."""
    body = status.name if status is not MessageStatus.REFUSED else (
        f"{status.name} {code} {reason or 'refused'}")
    return NewEntry(f"{message_id}:{status.name}", message_id, body)


def is_status(new: NewEntry, status: MessageStatus) -> bool:
    """Whether `new` (from `entry`) is an update to `status`."""
    return new.body.partition(" ")[0] == status.name


def from_record(record: InboundRecord) -> MessageUpdate:
    name, _, rest = record.body.partition(" ")
    code, _, reason = rest.partition(" ")
    return MessageUpdate(record.session_id, record.sender, MessageStatus[name],
                         record.received_at, int(code or 0), reason,
                         update_id=record.inbound_id)


def latest(records: Sequence[InboundRecord]) -> MessageUpdate | None:
    """The furthest status among a message's stored updates (a refusal wins)."""
    updates = sorted((from_record(r) for r in records), key=lambda u: (u.status.final,
                                                                        u.status, u.at))
    return updates[-1] if updates else None


class UpdatesService:
    """ReceiveUpdates, AckUpdates and the per-message look-up, over the store."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self._stream = InboundService(store, settings, topic=UPDATES)

    async def receive(
        self, session_ids: Sequence[str], group: str = "", consumer: str = "",
        max_unacked: int = 0,
    ) -> AsyncGenerator[UpdateDelivery, None]:
        deliveries = self._stream.receive(session_ids, group, consumer, max_unacked)
        try:
            async for delivery in deliveries:
                yield _delivered(delivery)
        finally:
            await deliveries.aclose()

    async def ack(self, session_id: str, group: str, update_ids: Sequence[str]) -> int:
        return await self._stream.ack(session_id, group, update_ids, field="update_ids")

    async def latest(self, session_id: str, message_id: str) -> MessageUpdate | None:
        """The furthest stored update of the message (kept for the inbound retention)."""
        keys = [f"{message_id}:{status.name}" for status in MessageStatus]
        found = await self.store.find_inbound(session_id, keys, topic=UPDATES)
        return latest(list(found.values()))

    async def info(self, session_id: str, message_id: str) -> MessageInfo:
        """The message's furthest status: its stored updates, else its stored result
        (acked or refused), else QUEUED while it is in the outbox."""
        validation.session_id(session_id)
        limit = validation.MAX_MESSAGE_ID
        if not message_id or len(message_id) > limit:
            raise InvalidArgument("message_id", f"must be 1-{limit} characters")
        sent = await self.store.sent_message(session_id, message_id)
        update = await self.latest(session_id, message_id)
        if update is not None:
            return MessageInfo(session_id, message_id, update.status, update.at, update.code,
                               update.reason, sent)
        result = await self.store.result(session_id, message_id)
        if result is not None:
            status = MessageStatus.SERVER_ACK if result.ok else MessageStatus.REFUSED
            return MessageInfo(session_id, message_id, status, result.acked_at,
                               result.refused_code, result.refused, sent)
        if sent is not None:
            return MessageInfo(session_id, message_id, MessageStatus.QUEUED, sent.accepted_at,
                               sent=sent)
        if await self.store.get_session(session_id) is None:
            raise SessionNotFound(session_id)
        raise MessageNotFound(f"session {session_id!r} has no message {message_id[:80]!r} "
                              "(or no longer keeps it)", session_id=session_id,
                              message_id=message_id[:80])


def _delivered(delivery: InboundDelivery) -> UpdateDelivery:
    return UpdateDelivery(from_record(delivery.record), delivery.delivery_count)
