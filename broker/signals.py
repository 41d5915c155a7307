"""What a long-running command serves until: SIGINT or SIGTERM.

The handlers are installed on the loop explicitly, so a process started with
SIGINT ignored (as a shell does for a background job) still stops on it."""

from __future__ import annotations

import asyncio
import contextlib
import signal


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
