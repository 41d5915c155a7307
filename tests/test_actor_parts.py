"""The small pieces the session actor is built from (timers, mailbox, status
recorder), and one rule of its connection. No fixed sleeps: timer firings are
built by hand, the store and the upstream are fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import Settings
from broker.content import Presence
from broker.errors import StoreUnavailable
from broker.lifecycle.actions import Emit, Timer
from broker.lifecycle.inputs import Start
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import State
from broker.runtime.actor import SessionActor
from broker.runtime.bus import StatusBus
from broker.runtime.mailbox import Mailbox, Wake
from broker.runtime.recorder import StatusRecorder
from broker.runtime.timers import TimerDue, Timers, coalesced
from broker.store.base import SessionRecord, StatusEvent
from broker.store.memory import MemoryStore
from broker.upstream.events import Ready, UpstreamEvent
from broker.upstream.provider import Outgoing
from tests.helpers import eventually


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


@given(st.floats(0, 1e7), st.sampled_from([0.001, 0.1, 0.25, 3.0]))
def test_a_coalesced_deadline_is_on_the_grid_and_at_most_one_step_late(
    when: float, step: float
) -> None:
    late = coalesced(when, step)
    assert when - 1e-6 <= late <= when + step
    assert coalesced(late, step) == pytest.approx(late)  # already on the grid
    assert coalesced(when, 0.0) == when


async def test_timers_allowed_slack_share_one_deadline() -> None:
    """Keep-alives of sessions armed at slightly different moments run out together,
    in one wake of the loop; a timer without slack keeps its own deadline."""
    loop = asyncio.get_running_loop()
    sessions = [Timers(_Inbox()) for _ in range(50)]
    for i, timers in enumerate(sessions):
        timers.start(Timer.KEEPALIVE, 30.0 + i * 0.001, slack_s=0.25)
    deadlines = {t.deadline(Timer.KEEPALIVE) for t in sessions}
    assert len(deadlines) <= 2  # one grid step, or two if the 50 ms straddle a line
    now = loop.time()
    assert all(now + 30.0 <= d <= now + 30.05 + 0.25 for d in deadlines if d is not None)
    exact = Timers(_Inbox())
    exact.start(Timer.RETRY, 1.234)
    retry = exact.deadline(Timer.RETRY)
    assert retry is not None and retry == pytest.approx(loop.time() + 1.234, abs=0.05)
    exact.cancel(Timer.RETRY)
    assert exact.deadline(Timer.RETRY) is None
    for timers in sessions:
        timers.cancel_all()


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
    recorder = StatusRecorder("s-1", "default", store=store, fence=None, publish=bus.publish,
                              retry=lambda: retries.append(None))
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


class _Link:
    """A link that says `ready` and then stays quiet until closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        yield Ready("c-1")
        await self.closed.wait()

    async def send(self, messages: Sequence[Outgoing]) -> None: ...
    async def send_presence(self, chat: str, presence: Presence) -> None: ...
    async def ping(self, ping_id: int) -> None: ...
    async def logout(self) -> None: ...
    async def ack_inbound(self, message_id: str) -> None: ...

    async def request_pairing_code(self, phone_number: str) -> str:
        raise AssertionError("not asked in this test")

    async def close(self, code: DisconnectCode, reason: str) -> None:
        self.closed.set()

    def abort(self) -> None:
        self.closed.set()


class _Provider:
    def __init__(self) -> None:
        self.connects = 0

    async def connect(self, login: str, credentials: dict[str, Any] | None,
                      kv: object = None) -> _Link:
        self.connects += 1
        return _Link()


async def test_a_lease_that_goes_stale_while_connecting_is_a_failed_attempt_not_a_hang() -> None:
    """The lease is fresh when the machine opens the connection but not once the
    credentials are read: no connection, and the session retries (and would
    fence itself there if the lease were still stale) instead of sitting in
    CONNECTING with no link and no deadline."""
    answers = iter([True, False])  # OpenConnection: fresh; after the credentials: stale
    provider = _Provider()
    settings = Settings(lifecycle=LifecyclePolicy(backoff_initial_s=0.01, backoff_max_s=0.01,
                                                  keepalive_interval_s=None))
    actor = SessionActor(SessionRecord("s-1", "default"), store=MemoryStore(),
                         provider=provider, settings=settings,
                         may_connect=lambda _sid: next(answers, True))
    await actor.start()
    await actor.command(Start())
    await eventually(lambda: actor.state == State.OPEN, 10.0, "OPEN after the retry")
    assert provider.connects == 1 and not actor.fenced
    assert actor.stats.counters(0).connects_total >= 1
    await actor.shutdown()
