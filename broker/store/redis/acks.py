"""Wake-ups for `wait_result`: one pub/sub connection per store, shared by every waiter.

An ack is announced on its session's ``acked`` channel by the script that
stores it, so a Send accepted on one broker instance hears the ack received
by the owner on another without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rexc
from redis.asyncio.client import PubSub

from broker.store.base import DeliveryResult
from broker.store.redis.codecs import delivery_result, text
from broker.store.redis.connect import PubSubFactory

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiter:
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    result: DeliveryResult | None = None


@dataclass(eq=False)
class _Channel:
    waiters: dict[str, set[_Waiter]] = field(default_factory=dict)
    subscribed: bool = False
    unconfirmed: int = 0
    """SUBSCRIBE commands sent whose confirmation has not come back yet."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class AckListener:
    """One pub/sub connection per store, shared by every `wait_result` call.

    A waiter subscribes to its session's ack channel and waits for the
    subscription to be confirmed before it checks the stored result, so an
    ack is either already stored or is published to it: nothing slips
    between. Pub/sub is at-most-once across a reconnect, so after one every
    waiter re-checks, and each also re-checks every `recheck_s` as a last
    safety net.
    """

    def __init__(self, pubsub: PubSubFactory, control_channel: str, recheck_s: float) -> None:
        self._open_pubsub = pubsub
        self._control = control_channel
        self._recheck_s = recheck_s
        self._channels: dict[str, _Channel] = {}
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def wait(
        self, channel: str, message_id: str, timeout: float,
        check: Callable[[], Awaitable[DeliveryResult | None]],
    ) -> DeliveryResult | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ch = self._channels.setdefault(channel, _Channel())
        waiter = _Waiter()
        ch.waiters.setdefault(message_id, set()).add(waiter)
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run())
            await self._subscribe(channel, ch)
            while True:
                waiter.poke.clear()
                remaining = deadline - loop.time()
                if not ch.ready.is_set() and remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(remaining, self._recheck_s)):
                            await ch.ready.wait()
                if waiter.result is not None:
                    return waiter.result
                found = await check()
                if found is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, self._recheck_s)):
                        await waiter.poke.wait()
                if waiter.result is not None:
                    return waiter.result
        finally:
            waiters = ch.waiters.get(message_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del ch.waiters[message_id]
            if not ch.waiters:
                self._spawn_unsubscribe(channel)

    async def _subscribe(self, channel: str, ch: _Channel) -> None:
        async with self._lock:
            if self._pubsub is None or ch.subscribed:
                return  # the listener (re)subscribes every channel when it connects
            ch.subscribed = True
            ch.unconfirmed += 1
            ch.ready.clear()
            await self._pubsub.subscribe(channel)

    def _spawn_unsubscribe(self, channel: str) -> None:
        task = asyncio.ensure_future(self._unsubscribe(channel))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _unsubscribe(self, channel: str) -> None:
        async with self._lock:
            ch = self._channels.get(channel)
            if ch is None or ch.waiters:
                return
            del self._channels[channel]
            if ch.subscribed and self._pubsub is not None:
                with contextlib.suppress(rexc.RedisError, OSError):
                    await self._pubsub.unsubscribe(channel)

    async def _connect(self) -> PubSub:
        async with self._lock:
            pubsub = await self._open_pubsub()
            channels = list(self._channels)
            for name in channels:
                ch = self._channels[name]
                ch.subscribed, ch.unconfirmed = True, 1
                ch.ready.clear()
            await pubsub.subscribe(self._control, *channels)
            self._pubsub = pubsub
            return pubsub

    def _on_message(self, message: Mapping[str, Any]) -> None:
        kind = message.get("type")
        ch = self._channels.get(text(message.get("channel", b"")))
        if ch is None:
            return
        if kind == "subscribe":
            ch.unconfirmed = max(0, ch.unconfirmed - 1)
            if ch.unconfirmed == 0:
                ch.ready.set()
        elif kind == "message":
            mid, _, value = text(message["data"]).partition(" ")
            result = delivery_result(mid, value)
            for waiter in ch.waiters.get(mid, ()):
                waiter.result = result
                waiter.poke.set()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closed:
            pubsub: PubSub | None = None
            try:
                pubsub = await self._connect()
                backoff = 0.05
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._on_message(message)
            except (rexc.RedisError, OSError) as exc:
                log.debug("ack listener: %s; reconnecting", type(exc).__name__)
            finally:
                self._pubsub = None
                for ch in self._channels.values():
                    ch.subscribed, ch.unconfirmed = False, 0
                    ch.ready.clear()
                    for waiters in ch.waiters.values():
                        for waiter in waiters:
                            waiter.poke.set()  # re-check: a publish may have been lost
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

