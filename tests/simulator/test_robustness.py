"""Malformed input closes 4400 and never disturbs other logins."""

from __future__ import annotations

from typing import Any

import pytest

from broker.simulator import Simulator
from broker.upstream.protocol import Ack, Send, encode

from .helpers import dial, next_frame, open_session, send_raw, until_closed

GARBAGE: list[str | bytes | dict[str, Any]] = [
    "not json",
    "[1, 2, 3]",
    b"\xff\xfe\x00binary",
    {"type": "teleport"},
    {"type": "hello", "login": 42},
    {"no_type": True},
    {"type": "ready", "login": "x", "connection_id": "c-1"},
]


@pytest.mark.parametrize("payload", GARBAGE)
async def test_garbage_before_hello_is_4400(sim: Simulator, payload: Any) -> None:
    ws = await dial(sim)
    await send_raw(ws, payload)
    assert (await until_closed(ws)).code == 4400


@pytest.mark.parametrize(
    "payload",
    [
        {"type": "send", "id": 5, "to": "x", "body": "y"},
        {"type": "ping", "id": "seven"},
        {"type": "hello", "login": "alice", "credentials": None},
        b"\x00\x01",
    ],
)
async def test_garbage_on_an_open_connection_is_4400(sim: Simulator, payload: Any) -> None:
    victim, _ = await open_session(sim, "alice")
    bystander, _ = await open_session(sim, "bob")
    await send_raw(victim, payload)
    assert (await until_closed(victim)).code == 4400

    await bystander.send(encode(Send(id="m-1", to="x", body="still here")))
    assert await next_frame(bystander) == Ack(id="m-1")
    assert sim.live_connections("bob") == 1
    await bystander.close()


async def test_silence_before_hello_times_out(sim: Simulator) -> None:
    ws = await dial(sim)
    assert (await until_closed(ws)).code == 4408


async def test_reset_forgets_everything(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "alice")
    sim.set_unavailable(503, count=5)
    sim.reset()
    assert (await until_closed(ws)).code == 4428
    assert sim.record("alice").connection_attempts == 0
    ws, _ = await open_session(sim, "alice")  # no longer unavailable
    await ws.close()
