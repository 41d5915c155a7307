"""Group commit: calls that arrive while a store write is in flight share the next one.

With Redis every store call is a network round trip and a pass through the
client library; at 64 Sends in flight for one session, acks and enqueues that
each took their own round trip made the store, not the upstream, the limit.
A lone call is never held back (the flush starts on the loop's next turn). Under
load, when calls kept arriving during the previous write, an optional linger
lets the next write gather more of them: fewer, larger writes for a few
milliseconds of latency on calls that were waiting anyway. Lingering is for
items that trickle in one by one (unary Sends, submitted with `linger=True`):
a queue that holds `ENOUGH` already, or only items that came in a burst (a
many-Sends request, the acks of one upstream read), is written at once, since
waiting would only leave the loop idle while the burst's senders wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

ENOUGH = 16
"""Items queued from which a loaded batcher writes without lingering (why 16:
docs/benchmarks.md, issue 13 stop 19)."""


class Batcher(Generic[T, R]):
    """Feed items to `flush` in batches of at most `max_batch`, one batch at a time.

    `flush` returns one outcome per item, in order: its result, or the error
    that item alone failed with; an exception it raises
    fails the whole batch. Items submitted by a caller that has since been
    cancelled are still flushed: a write that was asked for is never half done.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        max_batch: int = 256,
        linger_s: float = 0.0,
        loaded: Callable[[], bool] | None = None,
        enough: int = ENOUGH,
    ) -> None:
        """`loaded()`: whether more items are certain to follow soon (say, acks of
        messages in flight), so that even a write the store does at once lingers.
        `enough`: a queue this long is written without lingering."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if enough < 1:
            raise ValueError("enough must be at least 1")
        self._flush = flush
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._loaded = loaded
        self._enough = min(enough, max_batch)
        self._queue: list[tuple[T, asyncio.Future[R] | None, bool]] = []
        self._lingering = 0
        """Queued items that may wait for company (`linger=True`)."""
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: T, *, linger: bool = True) -> asyncio.Future[R]:
        """Queue an item; the future resolves once its batch is written.

        `linger=False`: the item came with others, so its write need not wait
        for more (only items submitted with `linger=True` make a loaded write
        linger). Await the future: a caller that gives up cancels it, and a cancelled future is
        skipped, but an error set on one nobody awaits is logged as unretrieved.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._enqueue(item, future, linger)
        return future

    def post(self, item: T, *, linger: bool = True) -> None:
        """Queue an item whose outcome nobody waits for (`flush` reports its errors)."""
        self._enqueue(item, None, linger)

    def _enqueue(self, item: T, future: asyncio.Future[R] | None, linger: bool) -> None:
        self._queue.append((item, future, linger))
        self._lingering += linger
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def drain(self) -> None:
        """Return once everything submitted so far is flushed."""
        while self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    def cancel(self) -> None:
        """Drop what is queued (its futures are cancelled) and stop flushing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        queue, self._queue = self._queue, []
        self._lingering = 0
        for _, future, _ in queue:
            if future is not None:
                future.cancel()

    async def _run(self) -> None:
        # This task's first step runs on the loop's next turn, so everything made
        # ready by the same I/O (a burst of requests or of acks) is in the first
        # batch, for no added wait.
        # Calls that kept coming during the last write, or more certain to come
        # (`loaded`), mean load: then wait a moment so the next write carries more.
        busy = self._loaded is not None and self._loaded()
        while self._queue:
            if (busy and self._linger_s > 0 and self._lingering
                    and len(self._queue) < self._enough):
                await asyncio.sleep(self._linger_s)
            busy = True
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._lingering -= sum(linger for _, _, linger in batch)
            try:
                items = [item for item, _, _ in batch]
                outcomes: Sequence[R | BaseException] = await self._flush(items)
            except asyncio.CancelledError:
                for _, future, _ in batch:
                    if future is not None:
                        future.cancel()
                raise
            except Exception as exc:
                outcomes = [exc] * len(batch)
            if len(outcomes) != len(batch):
                error = RuntimeError(f"flush returned {len(outcomes)} outcomes for "
                                     f"{len(batch)} items")
                outcomes = [error] * len(batch)
            for (_, future, _), outcome in zip(batch, outcomes, strict=True):
                if future is None or future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
