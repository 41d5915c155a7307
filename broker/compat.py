"""Python 3.12's `asyncio.wait_for`, put in place on Python 3.11.

3.11's `wait_for` returns the awaited result when a cancel lands in the same
turn as that result (CPython gh-86296, fixed in 3.12 by building `wait_for` on
`asyncio.timeout`). The task then goes on as if never cancelled, and whoever
cancelled it waits for good. redis-py sends every command through
`asyncio.wait_for(drain(), socket_timeout)`, which finishes at once, so a cancel
of any task in a Redis call was lost about two times in three: the coordinator's
claim loop kept running after `stop()`, and a broker never exited. The
broker's own code uses `asyncio.timeout` (ruff TID251 refuses `wait_for` in
broker/ and clients/); this fixes the libraries under it.

Installed on `import broker`: the whole process runs the broker's event loop.
The Python client (`broker_client`) patches nothing in its users' processes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(fut: Awaitable[T], timeout: float | None) -> T:
    """As in Python 3.12: a cancel always propagates; TimeoutError after `timeout`."""
    if timeout is not None and timeout <= 0:
        task = asyncio.ensure_future(fut)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait([task])
        try:
            return task.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await fut


def install() -> bool:
    """Put `wait_for` in place of 3.11's (again is harmless); whether this Python needed it."""
    if sys.version_info >= (3, 12):
        return False
    asyncio.wait_for = wait_for  # type: ignore[assignment]
    asyncio.tasks.wait_for = wait_for  # type: ignore[assignment]
    return True
