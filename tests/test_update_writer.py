"""The outbox writer does not wait for the status updates of its last batch: they
have a writer of their own, which keeps their order. With Redis the updates are a
second round trip per batch; behind it, the session's next Sends waited. Also: the
outbox is taken over once per connection, not on each restart of an idle loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from broker.config import Settings
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle.health import SessionStats
from broker.runtime.delivery import Delivery
from broker.runtime.updates import MessageStatus
from broker.store.base import InboundRecord, NewEntry, NewMessage, OutboxBatchResult
from broker.store.memory import MemoryStore
from tests.helpers import eventually

WAIT_S = 5.0


class _SlowUpdates(MemoryStore):
    """Status updates wait at a gate (a slow second round trip); everything else is fast."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.written: list[str] = []

    async def add_entries(self, session_id: str, entries: Sequence[NewEntry], at: float, *,
                          topic: str, fence: int | None = None) -> list[InboundRecord | None]:
        await self.gate.wait()
        self.written += [e.upstream_id for e in entries]
        return await super().add_entries(session_id, entries, at, topic=topic, fence=fence)


def _delivery(store: MemoryStore) -> Delivery:
    def not_owner(exc: NotOwner) -> None:
        raise AssertionError(exc)

    return Delivery("s-1", store=store, settings=Settings(), stats=SessionStats(),
                    clock=lambda: 1.0, fence=None, not_owner=not_owner,
                    spawn=asyncio.create_task, outbox_poll_s=None)


async def test_sends_are_accepted_while_the_last_batchs_updates_are_still_being_written() -> None:
    store = _SlowUpdates()
    delivery = _delivery(store)
    first = await delivery.enqueue(NewMessage("+4915112345678", "one", "k-1"))
    mid = first.message.message_id
    delivery.ack(mid)  # its SERVER_ACK update now waits at the gate
    await asyncio.sleep(0)
    second = await asyncio.wait_for(
        delivery.enqueue(NewMessage("+4915112345678", "two", "k-2")), WAIT_S)
    assert second.message.message_id != mid and store.written == []
    delivery.receipt(mid, MessageStatus.DELIVERED)
    delivery.receipt(mid, MessageStatus.READ)
    store.gate.set()
    await asyncio.wait_for(delivery.drain(), WAIT_S)
    assert store.written == [f"{mid}:SERVER_ACK", f"{mid}:DELIVERED", f"{mid}:READ"]
    result = await store.result("s-1", mid)
    assert result is not None and result.ok


class _FlakyStore(MemoryStore):
    """Refuses every write while `down` (Redis away), then takes them again."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.written: list[str] = []

    async def apply_outbox(self, *args: Any, **kwargs: Any) -> OutboxBatchResult:
        if self.down:
            raise StoreUnavailable("the store is away")
        return await super().apply_outbox(*args, **kwargs)

    async def add_entries(self, session_id: str, entries: Sequence[NewEntry], at: float, *,
                          topic: str, fence: int | None = None) -> list[InboundRecord | None]:
        if self.down:
            raise StoreUnavailable("the store is away")
        self.written += [e.upstream_id for e in entries]
        return await super().add_entries(session_id, entries, at, topic=topic, fence=fence)


async def test_updates_the_store_could_not_take_are_held_and_written_first_once_it_is_back(
) -> None:
    store = _FlakyStore()
    delivery = _delivery(store)
    first = await delivery.enqueue(NewMessage("+4915112345678", "one", "k-1"))
    mid = first.message.message_id
    store.down = True
    delivery.ack(mid)  # not recorded: the message will be resent and acked again
    delivery.receipt(mid, MessageStatus.DELIVERED)  # nothing would bring this one back
    await asyncio.wait_for(delivery.drain(), WAIT_S)
    assert store.written == [] and await store.result("s-1", mid) is None
    store.down = False
    delivery.ack(mid)  # the resend's ack
    await asyncio.wait_for(delivery.drain(), WAIT_S)
    assert store.written == [f"{mid}:DELIVERED", f"{mid}:SERVER_ACK"]
    result = await store.result("s-1", mid)
    assert result is not None and result.ok


class _CountingClaims(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.claims = 0

    async def claim_outbox(self, session_id: str, *, fence: int | None = None) -> int:
        self.claims += 1
        return await super().claim_outbox(session_id, fence=fence)


def _sent_on(link: _SentLink, mid: str) -> Callable[[], bool]:
    return lambda: mid in link.sent


class _SentLink:
    """Only what the delivery loop uses of a link: it records what was sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, messages: Sequence[Any]) -> None:
        self.sent += [m.message_id for m in messages]


async def test_the_outbox_is_taken_over_once_per_connection_not_per_idle_spell() -> None:
    # With Redis each take-over is a round trip (and a log line) before the next
    # send: a loop that ends idle between bursts and starts again on the same
    # connection must not take the outbox over again.
    store = _CountingClaims()
    delivery = _delivery(store)
    link = _SentLink()
    delivery.start(link)  # type: ignore[arg-type]
    for n in range(3):  # three bursts, each acked: the loop ends idle after each
        accepted = await delivery.enqueue(NewMessage("+4915112345678", f"m{n}", f"k-{n}"))
        mid = accepted.message.message_id
        await eventually(_sent_on(link, mid))
        delivery.ack(mid)
        await asyncio.wait_for(delivery.drain(), WAIT_S)
        await eventually(lambda: delivery.idle)
    assert len(link.sent) == 3 and store.claims == 1
    other = _SentLink()
    delivery.start(other)  # type: ignore[arg-type]  # a new connection: taken over again
    accepted = await delivery.enqueue(NewMessage("+4915112345678", "m3", "k-3"))
    await eventually(_sent_on(other, accepted.message.message_id))
    assert store.claims == 2
    delivery.stop()
