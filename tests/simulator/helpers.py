"""A bare protocol client for driving the simulator from tests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from broker.simulator import Simulator
from broker.upstream.protocol import Frame, Hello, Ready, decode, encode

STEP_S = 3.0  # bound on any single wait; generous so slow CI never flakes


@dataclass
class Closed:
    """How a connection ended: code None means no close frame was received."""

    code: int | None
    reason: str
    frames: list[Frame] = field(default_factory=list)


async def dial(sim: Simulator) -> ClientConnection:
    return await connect(sim.url, open_timeout=STEP_S, close_timeout=1.0, ping_interval=None)


async def say_hello(
    sim: Simulator, login: str, credentials: dict[str, Any] | None
) -> ClientConnection:
    ws = await dial(sim)
    await ws.send(encode(Hello(login=login, credentials=credentials)))
    return ws


async def next_frame(ws: ClientConnection) -> Frame:
    async with asyncio.timeout(STEP_S):
        return decode(await ws.recv())


async def open_session(sim: Simulator, login: str) -> tuple[ClientConnection, Ready]:
    """A ready connection for login, paired behind the scenes."""
    ws = await say_hello(sim, login, sim.issue_credentials(login))
    ready = await next_frame(ws)
    assert isinstance(ready, Ready), ready
    return ws, ready


async def reconnect(sim: Simulator, login: str, credentials: dict[str, Any]) -> ClientConnection:
    ws = await say_hello(sim, login, credentials)
    assert isinstance(await next_frame(ws), Ready)
    return ws


async def until_closed(ws: ClientConnection) -> Closed:
    """Read (and keep) frames until the connection ends."""
    frames: list[Frame] = []
    async with asyncio.timeout(STEP_S):
        while True:
            try:
                frames.append(decode(await ws.recv()))
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                if rcvd is None:
                    return Closed(None, "", frames)
                return Closed(rcvd.code, rcvd.reason, frames)


async def send_raw(ws: ClientConnection, payload: str | bytes | dict[str, Any]) -> None:
    await ws.send(json.dumps(payload) if isinstance(payload, dict) else payload)
