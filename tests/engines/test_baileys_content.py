"""Message content and presence on the Baileys engine (issue 15): the broker on Redis,
the real bridge process and its fake WhatsApp socket. What reaches `sendMessage`
(and `sendPresenceUpdate`) is counted at the fake: Baileys' AnyMessageContent, every
Buffer as its size and SHA-256."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

from broker.content import Content, Location, Media, MediaKind, Presence, Reaction, decode
from broker.lifecycle.states import State
from tests.engines.baileys_support import needs_bridge
from tests.engines.test_baileys_e2e import Rig, rig  # noqa: F401  (fixture)
from tests.helpers import eventually

pytestmark = needs_bridge

TO = "+4915123456789"
JID = "4915123456789@s.whatsapp.net"


def _buffer(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _kinds(blob: bytes) -> list[tuple[str, Content | None, dict[str, Any]]]:
    """(body, content, what sendMessage must get, Buffers as size and hash)."""
    return [
        ("", Content(Media(MediaKind.IMAGE, blob, "image/png", "cap"),
                     mentions=("+4915000000001",)),
         {"image": _buffer(blob), "mimetype": "image/png", "caption": "cap",
          "mentions": ["4915000000001@s.whatsapp.net"]}),
        ("", Content(Media(MediaKind.VIDEO, blob, "video/mp4")),
         {"video": _buffer(blob), "mimetype": "video/mp4"}),
        ("", Content(Media(MediaKind.AUDIO, blob, "audio/mpeg")),
         {"audio": _buffer(blob), "mimetype": "audio/mpeg", "ptt": False}),
        ("", Content(Media(MediaKind.VOICE_NOTE, blob, "audio/ogg; codecs=opus")),
         {"audio": _buffer(blob), "mimetype": "audio/ogg; codecs=opus", "ptt": True}),
        ("", Content(Media(MediaKind.DOCUMENT, blob, "application/pdf", "the report",
                           "report.pdf")),
         {"document": _buffer(blob), "mimetype": "application/pdf", "caption": "the report",
          "fileName": "report.pdf"}),
        ("", Content(Media(MediaKind.STICKER, blob, "image/webp")),
         {"sticker": _buffer(blob), "mimetype": "image/webp"}),
        ("", Content(Location(-33.92, 18.42, "Cape Town", "Harbour")),
         {"location": {"degreesLatitude": -33.92, "degreesLongitude": 18.42,
                       "name": "Cape Town", "address": "Harbour"}}),
        ("", Content(Reaction("3EB0ABCDEF", "\U0001f44d")),
         {"react": {"text": "\U0001f44d",
                    "key": {"remoteJid": JID, "id": "3EB0ABCDEF", "fromMe": False}}}),
        ("quoting", Content(reply_to="3EB0QUOTED"), {"text": "quoting"}),
        ("plain", None, {"text": "plain"}),
    ]


def _without_base64(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_base64(v) for k, v in value.items() if k != "base64"}
    return value


async def _sent(on: Rig, sid: str) -> list[dict[str, Any]]:
    return [s for s in (await on.fake.record())["sent"] if s["session"] == sid]


async def test_every_kind_reaches_send_message_exactly_once_in_order(rig: Rig) -> None:  # noqa: F811
    sids = ["bc1", "bc2", "bc3"]
    for sid in sids:
        await rig.pair(sid)
    blobs = {sid: os.urandom(100_000) for sid in sids}

    async def session(sid: str) -> list[str]:
        ids = []
        for n, (body, content, _) in enumerate(_kinds(blobs[sid])):
            outcome = await rig.manager.send(sid, TO, body, content=content,
                                             idempotency_key=f"k{n}", timeout=20.0)
            assert outcome.result is not None
            ids.append(outcome.message.message_id)
        return ids

    all_ids = await asyncio.gather(*(session(sid) for sid in sids))
    for sid, ids in zip(sids, all_ids, strict=True):
        sent = await _sent(rig, sid)
        assert [s["id"] for s in sent] == ids, "once per id, in order"
        for record, (_, _, expected) in zip(sent, _kinds(blobs[sid]), strict=True):
            assert record["jid"] == JID
            assert _without_base64(record["content"]) == expected
        assert sent[8]["quoted"]["key"] == {"remoteJid": JID, "id": "3EB0QUOTED",
                                            "fromMe": False}


async def test_a_socket_lost_mid_upload_sends_the_medium_once_after_the_reconnect(
    rig: Rig,  # noqa: F811
) -> None:
    sids = ["bu1", "bu2"]
    for sid in sids:
        await rig.pair(sid)
    # 7 MiB: over 9 MiB as base64, past the bridge's former line limit of 8 MiB.
    big = {sid: os.urandom(7 * 1024 * 1024) for sid in sids}
    for sid in sids:
        assert (await rig.fake.do("drop_media", session=sid, times=1))["ok"]
    connects = (await rig.fake.record())["connects"]

    async def session(sid: str) -> list[str]:
        image = Content(Media(MediaKind.IMAGE, big[sid], "image/jpeg"))
        sends = [rig.manager.send(sid, TO, "before", idempotency_key="b", timeout=30.0),
                 rig.manager.send(sid, TO, "", content=image, idempotency_key="i", timeout=30.0),
                 rig.manager.send(sid, TO, "after", idempotency_key="a", timeout=30.0)]
        outcomes = [await sends[0], *await asyncio.gather(*sends[1:])]
        assert all(o.result is not None for o in outcomes)
        return [o.message.message_id for o in outcomes]

    all_ids = await asyncio.gather(*(session(sid) for sid in sids))
    record = await rig.fake.record()
    for sid, ids in zip(sids, all_ids, strict=True):
        sent = [s for s in record["sent"] if s["session"] == sid]
        assert [s["id"] for s in sent] == ids
        assert sent[1]["content"]["image"]["sha256"] == hashlib.sha256(big[sid]).hexdigest()
        assert sent[1]["socket"] != sent[0]["socket"], "sent again on the next socket"
        assert record["connects"][sid] == connects[sid] + 1


async def test_presence_reaches_send_presence_update(rig: Rig) -> None:  # noqa: F811
    await rig.pair("bp1")
    await rig.manager.send_presence("bp1", TO, Presence.COMPOSING)
    await rig.manager.send_presence("bp1", "120363000000@g.us", Presence.PAUSED)

    async def presences() -> list[tuple[str, str]]:
        return [(p["type"], p["jid"]) for p in (await rig.fake.record())["presence"]
                if p["session"] == "bp1"]

    expected = [("composing", JID), ("paused", "120363000000@g.us")]
    seen: list[tuple[str, str]] = []
    deadline = asyncio.get_running_loop().time() + 10
    while seen != expected and asyncio.get_running_loop().time() < deadline:
        seen = await presences()
        await asyncio.sleep(0.05)
    assert seen == expected
    assert rig.state("bp1") == State.OPEN


async def test_a_retry_request_is_answered_for_text_only(rig: Rig) -> None:  # noqa: F811
    """Baileys' getMessage gets the text back; for a medium nothing (an empty text
    would go out instead of the image)."""
    await rig.pair("br1")
    text = await rig.manager.send("br1", TO, "hello again", timeout=20.0)
    quote = await rig.manager.send("br1", TO, "quoting", content=Content(reply_to="X"),
                                   timeout=20.0)
    image = await rig.manager.send("br1", TO, "", timeout=20.0, content=Content(
        Media(MediaKind.IMAGE, b"\x89PNG", "image/png")))
    answers = [(await rig.fake.do("get_message", session="br1", id=o.message.message_id,
                                  jid=JID))["message"] for o in (text, quote, image)]
    assert answers == [{"conversation": "hello again"}, {"conversation": "quoting"}, None]


async def test_inbound_media_reply_and_reaction_arrive_and_download_byte_exact(
    rig: Rig,  # noqa: F811
) -> None:
    """Through the real bridge: the fake sender's phone encrypts each medium with
    Baileys' encryptedStream, the bridge downloads it with Baileys' helper (once, as the
    message arrives), the broker keeps it; DownloadMedia gives the bytes back."""
    sids = ["bi1", "bi2", "bi3"]
    for sid in sids:
        await rig.pair(sid)
    sent = {sid: await rig.manager.send(sid, TO, f"order {sid}", timeout=20.0) for sid in sids}
    blobs = {sid: os.urandom(300_000) for sid in sids}
    docs = {sid: os.urandom(5_000) for sid in sids}

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    for sid in sids:
        mine = sent[sid].message.message_id
        for uid, text, content in (
            (f"{sid}-img", "", {"media": {"kind": "image", "data": b64(blobs[sid]),
                                          "mime_type": "image/jpeg", "caption": "look"}}),
            (f"{sid}-doc", "", {"media": {"kind": "document", "data": b64(docs[sid]),
                                          "mime_type": "application/pdf",
                                          "file_name": f"{sid}.pdf"}}),
            (f"{sid}-re", "thanks!", {"reply_to": mine}),
            (f"{sid}-like", "", {"reaction": {"message_id": mine, "emoji": "\U0001f44d"}}),
            (f"{sid}-loc", "", {"location": {"latitude": 1.5, "longitude": 2.5, "name": "",
                                             "address": ""}}),
        ):
            answer = await rig.fake.do("inbound", session=sid, id=uid, **{"from": JID},
                                       text=text, content=content)
            assert answer["ok"], answer

    got: dict[str, Any] = {}

    async def worker() -> None:
        async for delivery in rig.manager.inbound.receive(sids, "g"):
            got[delivery.record.upstream_id] = delivery.record
            await rig.manager.inbound.ack(delivery.record.session_id, "g",
                                          [delivery.record.inbound_id])

    task = asyncio.create_task(worker())
    try:
        await eventually(lambda: len(got) == 5 * len(sids), 20.0, "every inbound message")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for sid in sids:
        mine = sent[sid].message.message_id
        image = decode(got[f"{sid}-img"].content).kind
        assert isinstance(image, Media)
        assert (image.kind, image.mime_type, image.caption, image.size, image.data) == (
            MediaKind.IMAGE, "image/jpeg", "look", len(blobs[sid]), b"")
        assert (await rig.manager.media.download(sid, f"{sid}-img")).data == blobs[sid]
        kept = await rig.manager.media.download(sid, f"{sid}-doc")
        assert (kept.data, kept.media.file_name) == (docs[sid], f"{sid}.pdf")
        reply = got[f"{sid}-re"]
        assert reply.body == "thanks!" and decode(reply.content).reply_to == mine
        assert decode(got[f"{sid}-like"].content).kind == Reaction(mine, "\U0001f44d", True)
        assert decode(got[f"{sid}-loc"].content).kind == Location(1.5, 2.5)
    # Counted at WhatsApp's (fake) media servers: each medium fetched once, on arrival.
    downloads = (await rig.fake.record())["downloads"]
    assert len(downloads) == len(set(downloads)) == 2 * len(sids)
