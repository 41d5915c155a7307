"""Message content and presence end to end (issue 15): each content kind through Send,
SendStream (the client's coalesced sends) and the typed helpers reaches the upstream
exactly as sent, once per message id and in order, also across a connection lost
mid-upload; media over the limit are refused before anything is queued; presence is
rate limited and best effort. Counted at the simulator."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import pytest

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient, InvalidArgument, ResourceExhausted, Unavailable
from broker_client import content as c
from broker_client.v1 import broker_pb2 as pb
from tests.conftest import BrokerFactory
from tests.helpers import eventually, paired_session, wait_state

TO = "+4915123456789"


def _media(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "data": None}


def _expected(kind: str, data: bytes = b"") -> dict[str, Any]:
    """What the simulator records for each message of `_every_kind`."""
    expected: dict[str, dict[str, Any]] = {
        "image": {"media": {"kind": "image", "mime_type": "image/png", "caption": "a cap",
                            "file_name": "", **_media(data)},
                  "reply_to": "m-quoted", "mentions": ["+4915000000001"]},
        "video": {"media": {"kind": "video", "mime_type": "video/mp4", "caption": "",
                            "file_name": "", **_media(data)}},
        "voice": {"media": {"kind": "voice_note", "mime_type": "audio/ogg; codecs=opus",
                            "caption": "", "file_name": "", **_media(data)}},
        "audio": {"media": {"kind": "audio", "mime_type": "audio/mpeg", "caption": "",
                            "file_name": "", **_media(data)}},
        "document": {"media": {"kind": "document", "mime_type": "application/pdf",
                               "caption": "the report", "file_name": "report.pdf",
                               **_media(data)}},
        "sticker": {"media": {"kind": "sticker", "mime_type": "image/webp", "caption": "",
                              "file_name": "", **_media(data)}},
        "location": {"location": {"latitude": 52.52, "longitude": 13.405, "name": "Berlin",
                                  "address": "Mitte"}},
        "reaction": {"reaction": {"message_id": "m-0123", "emoji": "\U0001f44d",
                                  "from_me": True}},
        "quote": {"reply_to": "ABCD1234", "mentions": ["+4915000000002"]},
    }
    return expected[kind]


async def _every_kind(client: BrokerClient, sid: str, blobs: dict[str, bytes],
                      tag: str) -> list[tuple[str, str]]:
    """One message of every kind, concurrently: (kind, message id) in outbox order."""
    calls = [
        ("image", client.send_image(sid, TO, blobs["image"], "image/png", caption="a cap",
                                    reply_to="m-quoted", mentions=["+4915000000001"],
                                    idempotency_key=f"{tag}-image")),
        ("video", client.send_video(sid, TO, blobs["video"], idempotency_key=f"{tag}-video")),
        ("voice", client.send_audio(sid, TO, blobs["voice"], voice=True,
                                    idempotency_key=f"{tag}-voice")),
        ("audio", client.send_audio(sid, TO, blobs["audio"], "audio/mpeg",
                                    idempotency_key=f"{tag}-audio")),
        ("document", client.send_document(sid, TO, blobs["document"], "application/pdf",
                                          "report.pdf", caption="the report",
                                          idempotency_key=f"{tag}-document")),
        ("sticker", client.send_sticker(sid, TO, blobs["sticker"],
                                        idempotency_key=f"{tag}-sticker")),
        ("location", client.send_location(sid, TO, 52.52, 13.405, name="Berlin",
                                          address="Mitte", idempotency_key=f"{tag}-location")),
        ("reaction", client.send_reaction(sid, TO, "m-0123", "\U0001f44d", from_me=True,
                                          idempotency_key=f"{tag}-reaction")),
        ("quote", client.send_text(sid, TO, "quoting you", reply_to="ABCD1234",
                                   mentions=["+4915000000002"], idempotency_key=f"{tag}-quote")),
        ("text", client.send(sid, TO, "plain text", idempotency_key=f"{tag}-text")),
    ]
    results = await asyncio.gather(*(call for _, call in calls))
    assert all(r.acked for r in results)
    # In the session's outbox order: the call order on one stream; concurrent unary
    # calls race each other to the broker.
    ordered = sorted(zip(calls, results, strict=True), key=lambda pair: pair[1].sequence)
    return [(kind, r.message_id) for (kind, _), r in ordered]


def _blobs(size: int) -> dict[str, bytes]:
    return {k: os.urandom(size) for k in ("image", "video", "voice", "audio", "document",
                                          "sticker")}


def _check_record(sim: Simulator, sid: str, sent: list[tuple[str, str]],
                  blobs: dict[str, bytes]) -> None:
    accepted = sim.record(sid).accepted
    assert [m.id for m in accepted] == [mid for _, mid in sent], "once per id, in order"
    for (kind, mid), message in zip(sent, accepted, strict=True):
        assert message.to == TO
        if kind == "text":
            assert (message.body, message.content) == ("plain text", None)
            continue
        assert message.body == ("quoting you" if kind == "quote" else "")
        assert message.content == _expected(kind, blobs.get(kind, b"")), kind
        if kind in blobs:
            assert sim.media(sid, mid) == blobs[kind], f"{kind}: the bytes, exactly"


@pytest.mark.parametrize("coalesce", [True, False], ids=["stream", "unary"])
async def test_every_kind_reaches_the_upstream_exactly_as_sent(
    sim: Simulator, make_broker: BrokerFactory, coalesce: bool
) -> None:
    broker = await make_broker()
    sids = [f"content-{n}" for n in range(3)]
    for sid in sids:
        await paired_session(broker, sim, sid)
    blobs = {sid: _blobs(200_000) for sid in sids}
    async with BrokerClient(broker.address, timeout=30) as client:
        client.coalesce = coalesce
        sent = await asyncio.gather(*(_every_kind(client, sid, blobs[sid], "a") for sid in sids))
        # Retries with the same keys send nothing again.
        again = await asyncio.gather(*(_every_kind(client, sid, blobs[sid], "a")
                                       for sid in sids))
    assert sent == again
    for sid, messages in zip(sids, sent, strict=True):
        _check_record(sim, sid, messages, blobs[sid])
        assert sim.record(sid).duplicates == 0


async def test_a_connection_lost_mid_upload_delivers_the_medium_once_in_order(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker = await make_broker(max_media_bytes=8 * 1024 * 1024)
    sids = [f"upload-{n}" for n in range(3)]
    for sid in sids:
        await paired_session(broker, sim, sid)
    big = {sid: os.urandom(6 * 1024 * 1024) for sid in sids}  # past gRPC's default 4 MiB
    sim.set_faults(drop_media=len(sids))  # the first medium of each session breaks its link
    async with BrokerClient(broker.address, timeout=60) as client:
        async def session(sid: str) -> list[str]:
            before = await client.send(sid, TO, "before", idempotency_key="before")
            image = client.send_image(sid, TO, big[sid], idempotency_key="big")
            after = client.send(sid, TO, "after", idempotency_key="after")
            results = await asyncio.gather(image, after)
            return [before.message_id, *(r.message_id for r in results)]

        ids = await asyncio.gather(*(session(sid) for sid in sids))
    assert sum(sim.record(sid).media_drops for sid in sids) == len(sids)
    for sid, expected in zip(sids, ids, strict=True):
        record = sim.record(sid)
        assert record.accepted_ids() == expected
        assert sim.media(sid, expected[1]) == big[sid]
        before, image, _after = record.accepted
        assert image.connection_id != before.connection_id, "sent again on the next link"
        assert record.accepted[1].content is not None
        assert record.accepted[1].content["media"]["sha256"] == \
            hashlib.sha256(big[sid]).hexdigest()


async def test_a_medium_over_the_limit_is_refused_before_anything_is_queued(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker = await make_broker(max_media_bytes=1000)
    await paired_session(broker, sim, "limit")
    async with BrokerClient(broker.address, timeout=10) as client:
        with pytest.raises(InvalidArgument) as refused:
            await client.send_image("limit", TO, b"x" * 1001, idempotency_key="too-big")
        assert refused.value.metadata["field"] == "content.media.data"
        assert "1001 bytes" in refused.value.message and "limit is 1000" in refused.value.message
        # Past the gRPC message limit (the medium limit + 4 MiB) gRPC refuses it unread.
        with pytest.raises(ResourceExhausted):
            await client.send_image("limit", TO, b"x" * (5 * 1024 * 1024), idempotency_key="huge")
        fits = await client.send_image("limit", TO, b"x" * 1000, idempotency_key="fits")
        # The refused key was never used: the same key now queues the smaller one.
        retried = await client.send_image("limit", TO, b"y" * 10, idempotency_key="too-big")
    assert fits.acked and retried.acked and not retried.duplicate
    assert broker.manager is not None
    assert await broker.manager.store.outbox_depth("limit") == 0
    assert sim.record("limit").accepted_ids() == [fits.message_id, retried.message_id]


async def test_content_that_breaks_a_rule_is_invalid_argument_naming_the_field(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "rules")
    bad: list[tuple[str, dict[str, Any]]] = [
        ("body", {"body": "also a body", "content": c.location(1.0, 2.0)}),
        ("body", {"content": c.text("x", reply_to="m-1"), "body": "two texts"}),
        ("body", {"content": pb.Content(reply_to="m-1")}),  # a quote of nothing
        ("content.media.kind", {"content": pb.Content(media=pb.Media(data=b"x",
                                                                     mime_type="a/b"))}),
        ("content.media.mime_type", {"content": c.image(b"x", "jpeg")}),
        ("content.media.data", {"content": c.image(b"")}),
        ("content.location.latitude", {"content": c.location(91.0, 0.0)}),
        ("content.location.longitude", {"content": c.location(0.0, float("nan"))}),
        ("content.reaction.message_id", {"content": c.reaction("", "x")}),
        ("content.reaction.emoji", {"content": c.reaction("m-1", "x" * 65)}),
        ("content.reply_to", {"content": c.text("x", reply_to="has space")}),
        ("content.mentions", {"content": c.text("x", mentions=[" "])}),
        ("content.media.file_name", {"content": c.document(b"x", "a/b", "a\nb")}),
        ("content.text", {"content": c.text("")}),
    ]
    async with BrokerClient(broker.address, timeout=10) as client:
        for field, kwargs in bad:
            with pytest.raises(InvalidArgument) as refused:
                await client.send("rules", TO, **kwargs)
            assert refused.value.metadata["field"] == field, kwargs
    assert sim.record("rules").accepted == []


async def test_presence_reaches_the_upstream_rate_limited_and_never_queued(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker = await make_broker(presence_rate=0.001)  # a burst of 5, then nearly nothing
    await paired_session(broker, sim, "typing")
    async with BrokerClient(broker.address, timeout=10) as client:
        for state in ("composing", "paused", "recording", "available", "composing"):
            await client.send_presence("typing", TO, state)
        with pytest.raises(ResourceExhausted) as limited:
            await client.send_presence("typing", "123@g.us", "composing")
        assert limited.value.reason == "RATE_LIMITED" and limited.value.retry_after
        await eventually(lambda: len(sim.record("typing").presence) == 5, 10, "5 presences")
        assert [(p.to, p.presence) for p in sim.record("typing").presence] == [
            (TO, "composing"), (TO, "paused"), (TO, "recording"), (TO, "available"),
            (TO, "composing")]
        with pytest.raises(InvalidArgument) as invalid:
            await client.send_presence("typing", "", "composing")
        assert invalid.value.metadata["field"] == "chat"
        with pytest.raises(InvalidArgument):
            await client.send_presence("typing", TO, 0)
        await client.stop_session("typing")
        await wait_state(broker, "typing", State.STOPPED)
        with pytest.raises(Unavailable) as closed:
            await client.send_presence("typing", TO, "composing")
        assert closed.value.reason == "SESSION_NOT_OPEN"
        assert closed.value.metadata["state"] == "STOPPED"
    assert len(sim.record("typing").presence) == 5


async def test_concurrent_media_on_one_stream_stay_within_the_message_limit(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    """Eight 900 KB images at once on the client's coalesced stream, past this broker's
    5 MiB message limit together: all delivered, in order, byte for byte (how the
    client splits its requests: tests/client/test_client_content.py)."""
    broker = await make_broker(max_media_bytes=1024 * 1024)
    await paired_session(broker, sim, "many")
    images = [os.urandom(900 * 1024) for _ in range(8)]
    async with BrokerClient(broker.address, timeout=30) as client:
        assert client.coalesce
        results = await asyncio.gather(*(client.send_image("many", TO, image,
                                                           idempotency_key=f"i{n}")
                                         for n, image in enumerate(images)))
    assert [r.message_id for r in results] == sim.record("many").accepted_ids()
    assert [sim.media("many", r.message_id) for r in results] == images


async def test_the_same_key_with_other_content_returns_the_first_message(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "same-key")
    async with BrokerClient(broker.address, timeout=10) as client:
        first = await client.send_image("same-key", TO, b"\x89PNG", "image/png",
                                        idempotency_key="order-7")
        again = await client.send_location("same-key", TO, 1.0, 2.0, idempotency_key="order-7")
        text = await client.send("same-key", TO, "other body", idempotency_key="order-7")
    assert again.duplicate and text.duplicate
    assert again.message_id == text.message_id == first.message_id
    [only] = sim.record("same-key").accepted
    assert only.content is not None and only.content["media"]["kind"] == "image"
