"""The group-commit helper: no delay for a lone call, one flush for the ones that queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from broker.runtime.batching import Batcher


async def _until(check: Callable[[], object]) -> None:
    """Let the loop turn until `check()` holds (bounded: a hang fails)."""
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None

    async def flush(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_a_lone_item_is_flushed_alone_and_gets_its_result() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    assert await batcher.submit(4) == 40
    assert rec.batches == [[4]]


async def test_items_queued_during_a_flush_share_the_next_one() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[int, int] = Batcher(rec.flush, max_batch=3)
    first = batcher.submit(0)
    await _until(lambda: rec.batches)  # the first flush starts and blocks on the gate
    rest = [batcher.submit(i) for i in (2, 4, 6, 8)]
    rec.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [20, 40, 60, 80]
    assert rec.batches == [[0], [2, 4, 6], [8]]


async def test_items_submitted_in_the_same_turn_share_a_batch() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    assert await asyncio.gather(*(batcher.submit(i) for i in (0, 2, 4))) == [0, 20, 40]
    assert rec.batches == [[0, 2, 4]]


async def test_errors_are_per_item_or_for_the_whole_batch() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    with pytest.raises(ValueError, match="odd 3"):
        await batcher.submit(3)

    async def broken(items: list[int]) -> list[int | BaseException]:
        raise ConnectionError("store down")

    failing: Batcher[int, int] = Batcher(broken)
    futures = [failing.submit(i) for i in range(3)]
    for future in futures:
        with pytest.raises(ConnectionError):
            await future

    async def short(items: list[int]) -> list[int | BaseException]:
        return []

    with pytest.raises(RuntimeError, match="0 outcomes for 1 items"):
        await Batcher(short).submit(1)


async def test_a_caller_that_gives_up_does_not_unqueue_its_item() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    blocker = batcher.submit(0)
    await _until(lambda: rec.batches)
    waiter = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    waiter.cancel()
    rec.gate.set()
    await blocker
    await batcher.drain()
    assert rec.batches == [[0], [2]]


async def test_drain_waits_for_everything_and_cancel_drops_the_queue() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    futures = [batcher.submit(i) for i in (0, 2)]
    drained = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    rec.gate.set()
    await drained
    assert all(f.done() for f in futures)

    rec.gate = asyncio.Event()
    held = batcher.submit(4)
    await _until(lambda: len(rec.batches) == 2)
    queued = batcher.submit(6)
    batcher.cancel()
    await asyncio.sleep(0)
    assert held.cancelled() and queued.cancelled()
    await batcher.drain()  # nothing left: returns at once


def test_max_batch_must_be_positive() -> None:
    async def flush(items: list[int]) -> list[int | BaseException]:
        return list(items)

    with pytest.raises(ValueError):
        Batcher(flush, max_batch=0)


async def test_under_load_the_next_write_lingers_to_gather_more() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=1.0)
    first = batcher.submit(0)
    await _until(lambda: rec.batches)  # the first write is in flight
    second = [batcher.submit(2), batcher.submit(4)]  # calls kept coming meanwhile
    rec.gate.set()
    assert await first == 0
    late = batcher.submit(6)  # arrives while the next write lingers
    assert await asyncio.wait_for(asyncio.gather(*second, late), 10) == [20, 40, 60]
    assert rec.batches == [[0], [2, 4, 6]]


async def test_a_lone_call_never_lingers() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0)
    assert await asyncio.wait_for(batcher.submit(2), 10) == 20
    assert await asyncio.wait_for(batcher.submit(4), 10) == 40
    assert rec.batches == [[2], [4]]


async def test_posted_items_share_batches_and_nobody_waits_for_them() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush)
    batcher.post(1)  # its flush outcome is an error: nobody is there to retrieve it
    batcher.post(2)
    assert await batcher.submit(4) == 40
    assert rec.batches == [[1, 2, 4]]


async def test_a_loaded_batcher_lingers_before_its_first_write() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=1.0, loaded=lambda: True)
    first = batcher.submit(0)
    await _until(lambda: batcher._task is not None)
    for _ in range(5):  # several loop turns: an unloaded batcher would have flushed
        await asyncio.sleep(0)
    assert rec.batches == []
    late = batcher.submit(2)
    assert list(await asyncio.wait_for(asyncio.gather(first, late), 10)) == [0, 20]
    assert rec.batches == [[0, 2]]


async def test_a_loaded_batcher_with_enough_queued_writes_at_once() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0, loaded=lambda: True,
                                         enough=4)
    burst = [batcher.submit(i * 2) for i in range(4)]  # a stream's burst: enough to write
    assert list(await asyncio.wait_for(asyncio.gather(*burst), 10)) == [0, 20, 40, 60]
    fewer = [batcher.submit(i * 2) for i in range(3)]  # fewer than enough: it lingers
    for _ in range(5):
        await asyncio.sleep(0)
    assert rec.batches == [[0, 2, 4, 6]]
    batcher.cancel()
    assert all(f.cancelled() for f in fewer)


def test_enough_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Batcher(Recorder().flush, enough=0)


async def test_an_unloaded_batcher_writes_a_lone_item_at_once() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0, loaded=lambda: False)
    assert await asyncio.wait_for(batcher.submit(2), 10) == 20


async def test_a_loaded_batcher_of_burst_items_writes_at_once() -> None:
    # A many-Sends request's messages and an upstream read's acks come together:
    # waiting for company would only leave the loop idle.
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0, loaded=lambda: True)
    burst = [batcher.submit(i * 2, linger=False) for i in range(3)]
    batcher.post(7, linger=False)
    assert list(await asyncio.wait_for(asyncio.gather(*burst), 10)) == [0, 20, 40]
    assert rec.batches == [[0, 2, 4, 7]]


async def test_one_trickling_item_makes_a_loaded_batcher_linger() -> None:
    rec = Recorder()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0, loaded=lambda: True)
    burst = [batcher.submit(i * 2, linger=False) for i in range(3)]
    lone = batcher.submit(6)  # a unary Send: it may wait for the next ones
    for _ in range(5):
        await asyncio.sleep(0)
    assert rec.batches == []
    batcher.cancel()
    assert all(f.cancelled() for f in [*burst, lone])


async def test_once_the_trickling_items_are_written_a_burst_goes_at_once() -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()
    batcher: Batcher[int, int] = Batcher(rec.flush, linger_s=60.0, loaded=lambda: False)
    lone = batcher.submit(0)  # not loaded: written at once, and the gate holds it
    await _until(lambda: rec.batches)
    burst = [batcher.submit(i * 2, linger=False) for i in range(1, 3)]
    rec.gate.set()  # the next write is loaded (it follows one), but only of a burst
    assert await asyncio.wait_for(asyncio.gather(lone, *burst), 10) == [0, 20, 40]
    assert rec.batches == [[0], [2, 4]]
