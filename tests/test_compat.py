"""broker/compat.py: with the broker imported, a cancel that lands as an awaited
`asyncio.wait_for` finishes still cancels the task (Python 3.11's own returns the
result, and the task goes on; redis-py calls it for every command)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import broker  # noqa: F401  (installs the fix)
from broker import compat

TRIALS = 200

WaitFor = Callable[[Awaitable[Any], float | None], Awaitable[Any]]


async def _lost_cancels(wait_for: WaitFor) -> int:
    """Cancel a task that keeps awaiting quick `wait_for`s at varied turns; count
    the cancels it went on through."""

    async def quick() -> int:
        await asyncio.sleep(0)  # one turn, as a socket drain that finishes at once
        return 1

    async def loop() -> None:
        for _ in range(500):  # bounded: a lost cancel shows as a task still running
            await wait_for(quick(), 5.0)

    lost = 0
    for trial in range(TRIALS):
        task = asyncio.create_task(loop())
        for _ in range(trial % 9):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            lost += 1
    return lost


async def test_the_installed_wait_for_never_loses_a_cancel() -> None:
    assert asyncio.wait_for is compat.wait_for or sys.version_info >= (3, 12)
    assert await _lost_cancels(asyncio.wait_for) == 0


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12's own wait_for is right")
async def test_python_311s_own_wait_for_loses_cancels() -> None:
    """Why the fix is there: 3.11's original, run the same way, goes on after cancels."""
    import asyncio.tasks as tasks

    original = tasks.__dict__.get("_wait_for_311") or _stdlib_wait_for()
    assert await _lost_cancels(original) > 0


def _stdlib_wait_for() -> WaitFor:
    """3.11's wait_for, loaded afresh from the stdlib source (the module's is replaced)."""
    import importlib.util

    spec = importlib.util.find_spec("asyncio.tasks")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    wait_for: WaitFor = fresh.wait_for
    return wait_for


async def test_a_timeout_of_zero_or_less_times_out_unless_done() -> None:
    async def slow() -> int:
        await asyncio.sleep(10)
        return 1

    with pytest.raises(TimeoutError):
        await compat.wait_for(slow(), 0)
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    done.set_result(7)
    assert await compat.wait_for(done, -1) == 7
    with pytest.raises(TimeoutError):
        await compat.wait_for(slow(), 0.01)
    assert await compat.wait_for(asyncio.sleep(0, 3), None) == 3
