"""Group commit: calls that arrive while a store write is in flight share the next one.

With Redis every store call is a network round trip and a pass through the
client library; at 64 Sends in flight for one session, acks and enqueues that
each took their own round trip made the store, not the upstream, the limit.
A lone call is never held back (the flush starts on the loop's next turn). Under
load, when calls kept arriving during the previous write, an optional linger
lets the next write gather more of them: fewer, larger writes for a few
milliseconds of latency on calls that were waiting anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

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
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._flush = flush
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue an item; the future resolves once its batch is written."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)  # a caller that gave up is not an error
        self._queue.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return future

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
        for _, future in queue:
            future.cancel()

    async def _run(self) -> None:
        # This task's first step runs on the loop's next turn, so everything made
        # ready by the same I/O (a burst of requests or of acks) is in the first
        # batch, for no added wait.
        busy = False
        while self._queue:
            if busy and self._linger_s > 0 and len(self._queue) < self._max_batch:
                # Calls kept coming during the last write: under load, wait a
                # moment more so the next write carries more of them.
                await asyncio.sleep(self._linger_s)
            busy = True
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            try:
                items = [item for item, _ in batch]
                outcomes: Sequence[R | BaseException] = await self._flush(items)
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:
                outcomes = [exc] * len(batch)
            if len(outcomes) != len(batch):
                error = RuntimeError(f"flush returned {len(outcomes)} outcomes for "
                                     f"{len(batch)} items")
                outcomes = [error] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
