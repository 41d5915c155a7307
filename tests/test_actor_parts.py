"""The small pieces the session actor is built from: timers, mailbox, status recorder.

No sleeps: timer firings are built by hand, and the store is a fake.
"""

from __future__ import annotations

import asyncio

from broker.errors import StoreUnavailable
from broker.lifecycle.actions import Emit, Timer
from broker.lifecycle.states import State
from broker.runtime.bus import StatusBus
from broker.runtime.mailbox import Mailbox, Wake
from broker.runtime.recorder import StatusRecorder
from broker.runtime.timers import TimerDue, Timers
from broker.store.base import StatusEvent
from broker.store.memory import MemoryStore


class _Inbox:
    def __init__(self) -> None:
        self.items: list[TimerDue] = []

    def put_nowait(self, item: TimerDue) -> None:
        self.items.append(item)


async def test_a_firing_counts_once_and_only_for_the_current_arming() -> None:
    timers = Timers(_Inbox())
    timers.start(Timer.RETRY, 60.0)
    first = TimerDue(Timer.RETRY, 1)
    timers.start(Timer.RETRY, 60.0)  # re-armed: the first firing is stale
    assert not timers.fired(first)
    current = TimerDue(Timer.RETRY, 2)
    assert timers.fired(current)
    assert not timers.fired(current)  # disarmed by firing
    timers.start(Timer.PONG, 60.0)
    timers.cancel(Timer.PONG)
    assert not timers.fired(TimerDue(Timer.PONG, 3))
    timers.start(Timer.KEEPALIVE, 60.0)
    timers.cancel_all()
    assert not timers.fired(TimerDue(Timer.KEEPALIVE, 4))


async def test_a_timer_posts_its_firing_to_the_inbox() -> None:
    inbox: Mailbox[TimerDue] = Mailbox()
    timers = Timers(inbox)
    timers.start(Timer.HANDSHAKE, 0.0)
    due = await asyncio.wait_for(inbox.get(), 10.0)
    assert due == TimerDue(Timer.HANDSHAKE, 1) and timers.fired(due)


async def test_the_mailbox_keeps_order_and_wakes_its_reader() -> None:
    box: Mailbox[int] = Mailbox()
    reader = asyncio.ensure_future(box.get())
    await asyncio.sleep(0)  # let the reader park
    box.put_nowait(1)
    box.put_nowait(2)
    assert await reader == 1
    assert await box.get() == 2


async def test_wake_reports_whether_it_was_set() -> None:
    wake = Wake()
    assert not await wake.wait(0.0)
    wake.set()
    assert await wake.wait(0.0)
    wake.clear()
    assert not wake.is_set()


class _FlakyStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def append_event(self, event: StatusEvent, *, fence: int | None = None) -> StatusEvent:
        if self.down:
            raise StoreUnavailable("down")
        return await super().append_event(event, fence=fence)


def _emit(state: State, previous: State) -> Emit:
    return Emit(state, previous, "why", 0, None, None, 0)


async def test_events_the_store_refused_are_kept_in_order_and_stored_on_the_retry() -> None:
    store = _FlakyStore()
    bus = StatusBus()
    retries: list[None] = []
    recorder = StatusRecorder("s-1", "default", store=store, bus=bus, fence=None,
                              publish_locally=True, retry=lambda: retries.append(None))
    recorder.sequence = 7  # resumed from the store's last event
    recorder.record(_emit(State.CONNECTING, State.STOPPED), at=1.0)
    await recorder.store()
    recorder.record(_emit(State.OPEN, State.CONNECTING), at=2.0)
    await recorder.store()
    assert [e.sequence for e in recorder.unstored] == [8, 9]
    store.down = False
    await recorder.store_due()
    assert recorder.unstored == []
    last = await store.last_event("s-1")
    assert last is not None and last.sequence == 9 and last.state == State.OPEN
    await recorder.store_due()  # a retry that finds nothing kept does nothing
    recorder.cancel_retry()
