"""The membership heartbeat on its own thread, event loop and Redis connection.

On the broker's event loop the heartbeat queued behind whatever else was
ready (thousands of actor starts, the event tail, big pipelines on shared
connections), so a busy but healthy broker could miss the confirmation that
keeps its leases fresh and fence every session it held. Here it is only
held up by its own round trip.

It must not outlive the work it vouches for: it renews only while the event
loop ticks `rules.Progress`, so a wedged loop loses the claim like a dead
process; a paused (SIGSTOP) process pauses this thread too. A renewal found
lost is handed to the event loop, which gives every session up; only once it
has (`loss_handled`) may the thread join again under a new incarnation, so no
lease of the old one ever looks fresh again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from broker.cluster import rules
from broker.cluster.membership import Membership

log = logging.getLogger(__name__)
STALL_STACK_FRAMES = 30
"""Innermost frames of the event loop's thread logged when it stalls."""


class Heartbeat:
    """With `client_factory` (a new Redis client, made on the thread), on its own
    thread; without (a store handed in without its URL), as a task on the caller's
    loop, as before."""

    def __init__(
        self,
        membership: Membership,
        client_factory: Callable[[], Any] | None,
        *,
        period_s: float,
        liveness: rules.Liveness,
        progress: rules.Progress,
        on_lost: Callable[[], object],
        on_joined: Callable[[], object],
        joined: bool,
    ) -> None:
        """`on_lost` / `on_joined` are called on this thread: they must only hand
        over to the event loop (`call_soon_threadsafe`); `on_lost`'s handler calls
        `loss_handled` once every session is given up."""
        self._membership = membership
        self._client_factory = client_factory
        self._period_s = period_s
        self._liveness = liveness
        self._progress = progress
        self._on_lost = on_lost
        self._on_joined = on_joined
        self._joined = joined
        self._handled = threading.Event()
        self._handled.set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="heartbeat", daemon=True)
        self._task: asyncio.Task[None] | None = None
        #: the event loop's thread (this one): what it runs is logged when it stalls
        self._loop_thread = threading.get_ident()

    @property
    def threaded(self) -> bool:
        return self._client_factory is not None

    def start(self) -> None:
        if self._client_factory is not None:
            self._thread.start()
        else:
            self._task = asyncio.create_task(self._loop(self._membership, threaded=False),
                                             name="coordinator-heartbeat")

    def loss_handled(self) -> None:
        self._handled.set()

    async def stop(self) -> None:
        """Stop renewing (at most one period later) and wait for the thread to end."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        elif self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, self._period_s * 5)

    def _main(self) -> None:
        asyncio.run(self._threaded())

    async def _threaded(self) -> None:
        assert self._client_factory is not None
        client = self._client_factory()
        try:
            await self._loop(self._membership.on(client), threaded=True)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _loop(self, membership: Membership, *, threaded: bool) -> None:
        """One heartbeat per period, timed from *before* each request."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                async with asyncio.timeout(self._period_s * 2):
                    await self._beat(membership, started)
            except Exception as exc:  # Redis away: fencing decides
                log.warning("heartbeat failed (Redis unreachable?): %s", exc)
            wait = max(0.0, self._period_s - (time.monotonic() - started))
            if threaded:  # nothing else runs on this loop: block in the stop event
                self._stop.wait(wait)
            else:
                await asyncio.sleep(wait)

    def _loop_stack(self) -> str:
        """What the stalled event loop's thread runs now (from this thread only),
        so the log names the code that held it."""
        if not self.threaded:
            return ""
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return ""
        return "; the event loop's thread is at:\n" + "".join(
            traceback.format_stack(frame, limit=STALL_STACK_FRAMES))

    async def _beat(self, membership: Membership, started: float) -> None:
        if not self._progress.may_renew(started):
            log.warning("event loop made no progress for %.1fs: not renewing the claim%s",
                        self._progress.stall_after_s, self._loop_stack())
            return
        if not self._joined:
            if not self._handled.is_set():
                return  # the loop has not given the old incarnation's sessions up yet
            self._joined = await membership.rejoin()
            if self._joined:
                log.warning("instance %s joined again under a new incarnation",
                            membership.instance_id)
                self._liveness.renewed(started)
                self._on_joined()
            return
        if await membership.heartbeat():
            self._liveness.renewed(started)
            return
        log.error("instance %s: its claim expired or another process holds it: giving up "
                  "every session", membership.instance_id)
        self._joined = False
        self._handled.clear()
        self._liveness.lost()
        self._on_lost()
