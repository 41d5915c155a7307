"""The real Baileys library (no fake socket) pointed by --baileys-ws-url at a local
websocket server that accepts each connection and closes it: the session must
report the reason Baileys gives and back off. Only the far end is missing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.server import ServerConnection, serve

from broker.config import Settings
from broker.engines.baileys import BaileysEngine
from broker.lifecycle.states import State
from broker.runtime.manager import SessionManager
from broker.store.memory import MemoryStore
from tests.engines.baileys_support import FAKE_ENV, needs_bridge
from tests.helpers import FAST_POLICY, eventually

pytestmark = needs_bridge


@pytest.fixture
async def closing_server() -> AsyncIterator[tuple[str, list[float]]]:
    seen: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append(asyncio.get_running_loop().time())
        await ws.close(1000, "go away")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/chat", seen


async def test_real_baileys_reports_the_close_and_backs_off(
    closing_server: tuple[str, list[float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = closing_server
    monkeypatch.delenv(FAKE_ENV, raising=False)
    engine = BaileysEngine(ws_url=url, wa_version="2.3000.1023223821")
    provider = await engine.start()
    manager = SessionManager(MemoryStore(), provider, Settings(lifecycle=FAST_POLICY))
    try:
        await manager.create("real")
        actor = manager.actors["real"]

        await eventually(lambda: len(seen) >= 3 and actor.state == State.RECONNECTING, 30,
                         "Baileys to connect, be closed and back off, 3 times")
        view = await manager.get("real")
        assert view.state == State.RECONNECTING
        assert view.code == 428, view  # Baileys: connectionClosed
        assert "Connection Terminated" in view.reason, view  # Baileys' own words
    finally:
        await manager.close()
        await engine.stop()
