"""The websocket link writes every message that is due in one socket write, and
the upstream still reads each as its own frame, in order (a real websockets
server on loopback)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from broker.content import Content, Location
from broker.lifecycle.reasons import DisconnectCode
from broker.upstream.provider import Outgoing
from broker.upstream.websocket import BurstConnection, WebsocketProvider


class _Upstream:
    """Keeps every text message it reads, per connection, in arrival order."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.arrived = asyncio.Condition()

    async def handler(self, ws: ServerConnection) -> None:
        async for raw in ws:
            async with self.arrived:
                self.frames.append(json.loads(raw))
                self.arrived.notify_all()

    async def until(self, count: int) -> list[dict[str, Any]]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.frames) >= count), 10)
        return self.frames


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[_Upstream, str]]:
    up = _Upstream()
    async with serve(up.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield up, f"ws://127.0.0.1:{port}"


def _count_writes(ws: BurstConnection) -> list[bytes]:
    """Record what reaches the socket transport (the one seam below websockets)."""
    writes: list[bytes] = []
    real = ws.transport.write

    def write(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        real(data)

    ws.transport.write = write  # type: ignore[method-assign]
    return writes


async def test_a_burst_of_texts_is_one_socket_write_and_many_frames(
    upstream: tuple[_Upstream, str],
) -> None:
    up, url = upstream
    async with connect(url, create_connection=BurstConnection, compression=None) as ws:
        assert isinstance(ws, BurstConnection)
        writes = _count_writes(ws)
        await ws.send_texts([json.dumps({"n": n}) for n in range(50)])
        frames = await up.until(50)
        sent = list(writes)  # (the close frame comes after)
    assert [f["n"] for f in frames] == list(range(50))
    assert len(sent) == 1


async def test_the_link_sends_every_message_in_order_in_one_write(
    upstream: tuple[_Upstream, str],
) -> None:
    up, url = upstream
    link = await WebsocketProvider(url).connect("login-1", None)
    await up.until(1)  # the hello
    writes = _count_writes(link._ws)
    place = Content(Location(52.5, 13.4, "office"))
    messages = [Outgoing(f"m-{n}", "+15550100", f"body {n}") for n in range(40)]
    messages.insert(7, Outgoing("m-loc", "+15550100", "", place))
    await link.send(messages)
    frames = (await up.until(42))[1:]
    sent = list(writes)
    await link.close(DisconnectCode.LOGGED_OUT, "done")
    assert [f["type"] for f in frames] == ["send"] * 41
    assert [f["id"] for f in frames] == [m.message_id for m in messages]
    assert frames[7]["content"]["location"]["name"] == "office"
    assert len(sent) == 1

