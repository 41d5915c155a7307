"""Many Sends on one call (SendStream, SendBatch): each message with Send's
guarantees, accepted in the caller's order per session, all waits in parallel.

Why not one Send after another: a Send waits for the upstream ack, so one at a
time is one round trip per message; and why not all at once: unordered tasks
would lose the per-session FIFO a caller gets from writing items in order.
Here an item of a session waits only until the one before it is *placed* (its
position in the session's outbox is fixed: handed to the actor's write batch,
or stored by another instance's enqueue), not until it is durable, so the
items of one call still share the session's group commits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from broker.content import Content
from broker.errors import BrokerError, ErrorReason

log = logging.getLogger(__name__)

#: Unanswered items one call may hold; past it the call stops reading (backpressure).
MAX_IN_FLIGHT = 4096


@dataclass(frozen=True)
class SendItem:
    """One message of a many-Sends call; `ref` is the caller's handle for it."""

    ref: int
    session_id: str
    to: str
    body: str
    idempotency_key: str = ""
    wait: bool = True
    timeout: float | None = None
    content: Content | None = None


class SendOne(Protocol):
    """Sends one item; calls `placed()` once the item's outbox position is fixed."""

    def __call__(self, item: SendItem, placed: Callable[[], None]) -> Awaitable[object]: ...


Guard = Callable[[str], Awaitable[None]]

Outcome = object | BrokerError
"""What `SendOne` returned (the manager's SendOutcome), or the item's typed error."""


class SendFlow:
    """The items of one call: `submit` starts each, `results` yields (ref, outcome)
    as items finish, `close` says no more items come."""

    def __init__(self, send: SendOne, max_in_flight: int = MAX_IN_FLIGHT,
                 guard: Guard | None = None) -> None:
        """`guard(session_id)`: checked before each item (raising a BrokerError answers
        that item with it), e.g. whether the caller may send for the session."""
        self._send = send
        self._guard = guard
        self._room = asyncio.Semaphore(max_in_flight)
        self._last_placed: dict[str, asyncio.Future[None]] = {}
        self._done: asyncio.Queue[tuple[int, Outcome] | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unanswered = 0
        self._closed = False

    async def submit(self, item: SendItem) -> None:
        """Start an item (waits while `max_in_flight` items are unanswered)."""
        if self._closed:
            raise RuntimeError("submit after close")
        await self._room.acquire()
        before = self._last_placed.get(item.session_id)
        placed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_placed[item.session_id] = placed
        self._unanswered += 1
        task = asyncio.create_task(self._run(item, before, placed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """No more items: `results` ends once the started ones are answered."""
        if not self._closed:
            self._closed = True
            self._done.put_nowait(None)

    def cancel(self) -> None:
        """The caller went away: stop waiting (what was accepted stays accepted)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    async def results(self) -> AsyncIterator[list[tuple[int, Outcome]]]:
        """(ref, outcome) of the items finished since the last yield, as they finish,
        until closed and all answered: what finished together is answered together."""
        while not (self._closed and self._unanswered == 0):
            ready = [await self._done.get()]
            while not self._done.empty():
                ready.append(self._done.get_nowait())
            answered = [entry for entry in ready if entry is not None]
            self._unanswered -= len(answered)
            if answered:
                yield answered

    async def _run(
        self, item: SendItem, before: asyncio.Future[None] | None, placed: asyncio.Future[None]
    ) -> None:
        def mark_placed() -> None:
            if not placed.done():
                placed.set_result(None)

        outcome: Outcome
        try:
            if before is not None and not before.done():
                await before  # the previous item of the session has its place
            if self._guard is not None:
                await self._guard(item.session_id)
            outcome = await self._send(item, mark_placed)
        except BrokerError as exc:
            outcome = exc
        except asyncio.CancelledError:
            mark_placed()
            raise
        except Exception as exc:  # a bug: answer this item INTERNAL, keep the call
            log.exception("unexpected error sending item %s", item.ref, exc_info=exc)
            outcome = BrokerError("internal error; see the broker's log",
                                  reason=ErrorReason.INTERNAL)
        finally:
            mark_placed()
            if self._last_placed.get(item.session_id) is placed:
                del self._last_placed[item.session_id]
            self._room.release()
        self._done.put_nowait((item.ref, outcome))


async def send_all(send: SendOne, items: Sequence[SendItem],
                   guard: Guard | None = None) -> list[Outcome]:
    """Every item's outcome, in item order (SendBatch; refs need not be unique there)."""
    flow = SendFlow(send, max_in_flight=max(1, len(items)), guard=guard)
    for position, item in enumerate(items):
        await flow.submit(replace(item, ref=position))
    flow.close()
    outcomes: list[Outcome] = [None] * len(items)
    async for finished in flow.results():
        for position, outcome in finished:
            outcomes[position] = outcome
    return outcomes
