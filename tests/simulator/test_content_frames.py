"""The simulator's side of content and presence (docs/protocol.md "Content"): it
validates, records and acks what arrives, hands the media back through the control
endpoint, and drops a connection mid-upload on command."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator

import pytest

from broker.content import Content, Location, Media, MediaKind, Presence
from broker.simulator import Simulator, SimulatorConfig
from broker.simulator.control import SimulatorControl, SimulatorControlError
from broker.simulator.record import PresenceSeen
from broker.upstream.protocol import Ack, PresenceUpdate, Send, encode

from .helpers import next_frame, open_session, until_closed

BIG = bytes(range(256)) * 8192  # 2 MiB: past the 1 MiB of every other frame


@pytest.fixture
async def roomy() -> AsyncIterator[Simulator]:
    """Receipts off and time to read large frames on a busy machine."""
    async with Simulator(SimulatorConfig(idle_timeout_s=10.0, receipt_delay_s=0.0)) as sim:
        yield sim


async def test_content_is_recorded_and_its_medium_readable(roomy: Simulator) -> None:
    sim = roomy
    ws, ready = await open_session(sim, "alice")
    image = Content(Media(MediaKind.IMAGE, BIG, "image/png", "cap"), reply_to="Q",
                    mentions=("+1555",))
    await ws.send(encode(Send(id="m-1", to="+1", body="", content=image)))
    await ws.send(encode(Send(id="m-2", to="+1", body="", content=Content(Location(1.5, 2.5)))))
    await ws.send(encode(PresenceUpdate(to="+1", presence=Presence.COMPOSING)))
    await ws.send(encode(Send(id="m-1", to="+1", body="", content=image)))  # a resend
    acks = [await next_frame(ws) for _ in range(3)]
    assert [(a.id, a.duplicate) for a in acks if isinstance(a, Ack)] == [
        ("m-1", False), ("m-2", False), ("m-1", True)]
    record = sim.record("alice")
    assert record.accepted_ids() == ["m-1", "m-2"]
    assert record.accepted[0].content == {
        "media": {"kind": "image", "mime_type": "image/png", "caption": "cap", "file_name": "",
                  "data": None, "bytes": len(BIG), "sha256": hashlib.sha256(BIG).hexdigest()},
        "reply_to": "Q", "mentions": ["+1555"]}
    assert record.accepted[1].content == {
        "location": {"latitude": 1.5, "longitude": 2.5, "name": "", "address": ""}}
    assert record.presence == [PresenceSeen("+1", "composing", ready.connection_id)]
    control = SimulatorControl(sim.control_url)
    assert await asyncio.to_thread(control.media, "alice", "m-1") == BIG
    with pytest.raises(SimulatorControlError) as missing:
        await asyncio.to_thread(control.media, "alice", "m-2")
    assert missing.value.status == 400
    recorded = await asyncio.to_thread(control.record, "alice")
    assert recorded["accepted"][0]["content"]["media"]["bytes"] == len(BIG)
    assert recorded["presence"] == [{"to": "+1", "presence": "composing",
                                     "connection_id": ready.connection_id}]
    await ws.close()


@pytest.mark.parametrize("content", [
    {"media": {"kind": "image", "data": "not base64!", "mime_type": "a/b"}},
    {"media": {"kind": "hologram", "data": "AA==", "mime_type": "a/b"}},
    {"media": {"kind": "image", "data": "", "mime_type": "a/b"}},
    {"location": {"latitude": 91, "longitude": 0}},
    {"location": {"latitude": "north", "longitude": 0}},
    {"reaction": {"message_id": "", "emoji": "x"}},
    {"text": "a", "location": {"latitude": 1, "longitude": 1}},
    {"mentions": "+1"},
    "a string",
])
async def test_malformed_content_is_a_bad_frame(sim: Simulator, content: object) -> None:
    ws, _ = await open_session(sim, "bob")
    await ws.send(json.dumps({"type": "send", "id": "m-1", "to": "+1", "body": "",
                              "content": content}))
    closed = await until_closed(ws)
    assert closed.code == 4400
    assert sim.record("bob").accepted == []


async def test_a_bad_presence_is_a_bad_frame(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "carol")
    await ws.send(json.dumps({"type": "presence", "to": "+1", "presence": "dancing"}))
    assert (await until_closed(ws)).code == 4400
    assert sim.record("carol").presence == []


async def test_drop_media_breaks_the_connection_before_accepting(sim: Simulator) -> None:
    control = SimulatorControl(sim.control_url)
    answer = await asyncio.to_thread(control.faults, drop_media=1)
    assert answer["faults"]["drop_media"] == 1
    ws, _ = await open_session(sim, "dave")
    await ws.send(encode(Send(id="m-0", to="+1", body="text goes through")))
    assert await next_frame(ws) == Ack(id="m-0")  # its receipt comes 10 ms later
    data = base64.b64encode(b"\x01\x02").decode()
    await ws.send(json.dumps({"type": "send", "id": "m-1", "to": "+1", "body": "",
                              "content": {"media": {"kind": "sticker", "data": data,
                                                    "mime_type": "image/webp"}}}))
    closed = await until_closed(ws)
    assert closed.code is None, "dropped like a network, no close frame"
    assert sim.record("dave").accepted_ids() == ["m-0"]
    assert sim.record("dave").media_drops == 1
    assert sim.faults.drop_media == 0
    ws, _ = await open_session(sim, "dave")
    await ws.send(json.dumps({"type": "send", "id": "m-1", "to": "+1", "body": "",
                              "content": {"media": {"kind": "sticker", "data": data,
                                                    "mime_type": "image/webp"}}}))
    assert await next_frame(ws) == Ack(id="m-1")
    assert sim.media("dave", "m-1") == b"\x01\x02"
    with pytest.raises(SimulatorControlError):
        await asyncio.to_thread(control.faults, drop_media=-1)
    await ws.close()
