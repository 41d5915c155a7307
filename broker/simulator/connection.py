"""One client connection of the simulator: where it is in the handshake, and the
frames due on it (written in due order by one task), plus the close-reason rules."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
from enum import Enum

from websockets.asyncio.server import ServerConnection

from broker.lifecycle.reasons import DisconnectCode
from broker.simulator.record import Overlap

_MAX_REASON_BYTES = 120


class ConnState(Enum):
    HANDSHAKE = "handshake"  # waiting for hello
    PAIRING = "pairing"  # showing QR codes
    OPEN = "open"  # ready: sends allowed
    CLOSING = "closing"  # closed or being closed: every further frame is ignored


class FrameOutbox:
    """Frames due at given times, written in due order by one task.

    Latency and receipt delays then never block the read loop and never
    reorder frames that share a delay (ties keep insertion order).
    """

    def __init__(self, ws: ServerConnection) -> None:
        self._ws = ws
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()

    def put(self, text: str, delay_s: float = 0.0) -> None:
        due = asyncio.get_running_loop().time() + max(delay_s, 0.0)
        heapq.heappush(self._heap, (due, next(self._seq), text))
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            if not self._heap:
                await self._wake.wait()
                continue
            wait_s = self._heap[0][0] - loop.time()
            if wait_s > 0:
                # Wake early if a frame with an earlier due time arrives.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
                continue
            _, _, text = heapq.heappop(self._heap)
            await self._ws.send(text)


class Conn:
    """One client websocket and where it is in the handshake."""

    def __init__(self, ws: ServerConnection, conn_id: str) -> None:
        self.ws = ws
        self.id = conn_id
        self.login: str | None = None
        self.client = ""
        #: overlaps this connection was the older one of, with when each began
        self.overlapped: list[tuple[Overlap, float]] = []
        self.state = ConnState.HANDSHAKE
        self.outbox = FrameOutbox(ws)
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def closing(self) -> bool:
        return self.state is ConnState.CLOSING


def close_text(code: int) -> str:
    try:
        return DisconnectCode(code).text
    except ValueError:
        return "closed by the simulator"


def truncate(reason: str) -> str:
    # Websocket close reasons must fit in 123 bytes of UTF-8.
    return reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore")


def has_corrupt_credentials(raw: str | bytes) -> bool:
    """A hello whose credentials are neither null nor an object.

    decode() rejects it as a bad frame, but the protocol calls it a corrupt
    session (4500), which is what a client must be told so it stops retrying.
    """
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(obj, dict)
        and obj.get("type") == "hello"
        and isinstance(obj.get("login"), str)
        and obj.get("credentials") is not None
        and not isinstance(obj.get("credentials"), dict)
    )
