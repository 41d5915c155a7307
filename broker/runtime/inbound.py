"""Inbound messages to workers: validation, defaults and the flow-controlled receive loop.

The store does the at-least-once bookkeeping (consumer groups, pending lists,
redelivery); this module decides how much one stream may hold at a time and
how to wait on many sessions at once. It knows nothing about gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker import validation
from broker.config import Settings
from broker.errors import InvalidArgument, SessionNotFound
from broker.store.base import INBOUND, InboundDelivery, Store

log = logging.getLogger(__name__)

MAX_SESSIONS = 100
MAX_ACK_IDS = 1000
DEFAULT_GROUP = "default"
DEFAULT_MAX_UNACKED = 100
MAX_UNACKED = 10_000
_MAX_BLOCK_S = 2.0
"""Longest single blocking read, so idle messages are claimed soon after they qualify."""
_INBOUND_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # ASCII digits only; see fullmatch


@dataclass(eq=False)
class _Stream:
    """One Receive call's credit: deliveries handed out and not yet settled."""

    group: str
    max_unacked: int
    outstanding: dict[tuple[str, str], float] = field(default_factory=dict)
    """(session, inbound id) -> monotonic time after which it no longer counts."""
    reserved: int = 0
    """Credit taken by reads still in progress."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def expire(self, now: float) -> None:
        """Forget deliveries past the redelivery delay.

        From then on the store may hand them to another worker, so they no longer
        hold this stream back; it also frees credit when the ack went to another
        broker instance, which this one never hears about.
        """
        for key in [k for k, until in self.outstanding.items() if until <= now]:
            del self.outstanding[key]

    def free(self) -> int:
        return self.max_unacked - len(self.outstanding) - self.reserved

    def next_expiry_in(self, now: float) -> float | None:
        if not self.outstanding:
            return None
        return max(0.0, min(self.outstanding.values()) - now)

    def settle(self, session_id: str, inbound_ids: Sequence[str]) -> None:
        freed = False
        for iid in inbound_ids:
            freed |= self.outstanding.pop((session_id, iid), None) is not None
        if freed:
            self.changed.set()


class InboundService:
    """Receive and AckInbound over one topic of the store (INBOUND; UPDATES for
    `broker.runtime.updates`)."""

    def __init__(self, store: Store, settings: Settings, *, topic: str = INBOUND) -> None:
        self.store = store
        self.settings = settings
        self.topic = topic
        self._streams: set[_Stream] = set()

    async def receive(
        self, session_ids: Sequence[str], group: str = "", consumer: str = "",
        max_unacked: int = 0,
    ) -> AsyncGenerator[InboundDelivery, None]:
        """Deliveries for one worker until cancelled; never more than `max_unacked` unsettled.

        Validation happens before the first delivery, so bad input fails the call
        at once. One reader per session blocks in the store, so a quiet session
        never delays a busy one; each read takes only the credit it may fill.
        """
        group = validation.session_id(group, "group") if group else DEFAULT_GROUP
        consumer = (validation.session_id(consumer, "consumer") if consumer
                    else f"c-{uuid.uuid4().hex[:16]}")
        if max_unacked == 0:
            max_unacked = DEFAULT_MAX_UNACKED
        if not 1 <= max_unacked <= MAX_UNACKED:
            raise InvalidArgument("max_unacked", f"must be between 1 and {MAX_UNACKED}")
        # Last: bad input is INVALID_ARGUMENT whether or not the sessions exist.
        ids = await self._sessions(session_ids)
        redeliver_s = self.settings.inbound_redeliver_after_s
        block_s = min(_MAX_BLOCK_S, max(0.05, redeliver_s / 2))
        share = max(1, max_unacked // len(ids))

        stream = _Stream(group, max_unacked)
        readers: dict[asyncio.Task[list[InboundDelivery]], tuple[str, int]] = {}
        idle = list(ids)
        self._streams.add(stream)
        try:
            while True:
                stream.changed.clear()
                now = time.monotonic()
                stream.expire(now)
                for sid in list(idle):
                    take = min(share, stream.free())
                    if take <= 0:
                        break
                    stream.reserved += take
                    task = asyncio.create_task(self.store.read_inbound(
                        sid, group, consumer, take, block_s, topic=self.topic))
                    readers[task] = (sid, take)
                    idle.remove(sid)
                credit = asyncio.create_task(stream.changed.wait())
                waiting: set[asyncio.Future[Any]] = {credit, *readers}
                try:
                    await asyncio.wait(waiting, timeout=stream.next_expiry_in(now),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    credit.cancel()
                for task in [t for t in readers if t.done()]:
                    sid, take = readers.pop(task)
                    stream.reserved -= take
                    idle.append(sid)
                    until = time.monotonic() + redeliver_s
                    for delivery in task.result():
                        stream.outstanding[(sid, delivery.record.inbound_id)] = until
                        yield delivery
        finally:
            self._streams.discard(stream)
            for task in readers:
                task.cancel()
            # A read cancelled mid-way may have taken messages: they are pending
            # for this consumer and come back after the redelivery delay.
            if readers:
                await asyncio.wait(readers)
            await self._release(ids, group, consumer)

    async def _release(self, session_ids: Sequence[str], group: str, consumer: str) -> None:
        """The call's consumer is forgotten where it holds nothing (best effort: one
        left behind is pruned once idle, by a later read of the group)."""
        outcomes = await asyncio.gather(
            *(self.store.release_inbound_consumer(sid, group, consumer, topic=self.topic)
              for sid in session_ids),
            return_exceptions=True)
        for sid, outcome in zip(session_ids, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning("session %s: consumer %s of group %s not released: %s",
                            sid, consumer, group, outcome)

    async def ack(
        self, session_id: str, group: str, inbound_ids: Sequence[str], *,
        field: str = "inbound_ids",
    ) -> int:
        """Settle deliveries; frees the credit of this process's streams at once.
        `field`: the request field the ids came in (for errors)."""
        validation.session_id(session_id)
        group = validation.session_id(group, "group") if group else DEFAULT_GROUP
        if not inbound_ids:
            raise InvalidArgument(field, "is required")
        if len(inbound_ids) > MAX_ACK_IDS:
            raise InvalidArgument(field, f"must hold at most {MAX_ACK_IDS} ids")
        for iid in inbound_ids:
            if not _INBOUND_ID.fullmatch(iid):
                # Echo a bounded prefix: a 100 KB id would overflow the status metadata.
                raise InvalidArgument(field, f"{iid[:40]!r} is not an id this broker gave")
        if await self.store.get_session(session_id) is None:
            raise SessionNotFound(session_id)
        acked = await self.store.ack_inbound(session_id, group, list(inbound_ids),
                                             topic=self.topic)
        for stream in tuple(self._streams):
            if stream.group == group:
                stream.settle(session_id, inbound_ids)
        return acked

    async def _sessions(self, session_ids: Sequence[str]) -> list[str]:
        if not session_ids:
            raise InvalidArgument("session_ids", "is required")
        ids = list(dict.fromkeys(validation.session_id(s, "session_ids") for s in session_ids))
        if len(ids) > MAX_SESSIONS:
            raise InvalidArgument("session_ids", f"must name at most {MAX_SESSIONS} sessions")
        for sid in ids:
            if await self.store.get_session(sid) is None:
                raise SessionNotFound(sid)
        return ids
