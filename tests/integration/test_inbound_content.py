"""Inbound content end to end: simulator -> broker (each store) -> gRPC workers, and
DownloadMedia. Media of every kind arrive with their metadata and download byte-exact
(one larger than a chunk, one over --max-media-bytes with its reason), a reply carries
the quoted id, a reaction arrives as a reaction, a location as a location. Many
sessions, each with its own bytes: a bug that mixes sessions up shows."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.app import BrokerApp
from broker.content import Content, Location, Media, MediaKind, Reaction
from broker.simulator import Simulator
from broker.simulator.commands import generated_media
from broker_client import BrokerClient, InboundMessage
from broker_client.errors import FailedPrecondition, InvalidArgument, SessionNotFound
from broker_client.v1 import broker_pb2 as pb
from tests.conftest import BrokerFactory
from tests.helpers import STORES, broker_on_store, eventually, paired_session
from tests.redis_cluster import (  # noqa: F401  (fixtures)
    RedisClusterServers,
    shared_redis_cluster,
    shared_redis_cluster_servers,
)
from tests.redis_server import (  # noqa: F401  (fixtures)
    RedisServer,
    shared_redis,
    shared_redis_server,
)

SIDS = [f"im{i}" for i in range(6)]
MAX_MEDIA = 3 * 1024 * 1024
BIG = 2 * 1024 * 1024 + 12_345
"""Larger than DownloadMedia's 1 MiB chunk: the bytes come in three chunks."""
PEER = "+4915112345678"
WAIT_S = 20.0


@pytest.fixture(params=STORES)
async def app(request: pytest.FixtureRequest, make_broker: BrokerFactory,
              tmp_path: Path) -> BrokerApp:
    return await broker_on_store(request, make_broker, tmp_path, max_media_bytes=MAX_MEDIA)


@pytest.fixture
async def client(app: BrokerApp) -> AsyncIterator[BrokerClient]:
    made = BrokerClient(app.address, timeout=WAIT_S)
    yield made
    await made.close()


def _small(seed: int, kind: str) -> bytes:
    return hashlib.sha256(f"{seed}:{kind}".encode()).digest() * (10 + seed)


async def _inject(sim: Simulator, sid: str, n: int, sent_id: str) -> dict[str, str]:
    """Every content kind for session `sid`; name -> upstream id."""
    ids: dict[str, str] = {}
    ids["text"] = await sim.inbound(sid, PEER, f"hello {sid}")
    ids["image"] = await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.IMAGE, generated_media(n, BIG), "image/jpeg", caption=f"photo {sid}")))
    ids["document"] = await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.DOCUMENT, _small(n, "doc"), "application/pdf", caption="invoice",
        file_name=f"invoice-{sid}.pdf")))
    ids["voice"] = await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.VOICE_NOTE, _small(n, "ptt"), "audio/ogg; codecs=opus")))
    ids["sticker"] = await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.STICKER, _small(n, "sticker"), "image/webp")))
    ids["too_big"] = await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.VIDEO, generated_media(n + 100, MAX_MEDIA + 1), "video/mp4")))
    ids["location"] = await sim.inbound(sid, PEER, "", Content(Location(
        52.52 + n, 13.405, name="Alexanderplatz", address="Berlin")))
    ids["reply"] = await sim.inbound(sid, PEER, f"about your photo {sid}", Content(
        reply_to=ids["image"], mentions=(PEER,)))
    ids["reaction"] = await sim.inbound(sid, PEER, "", Content(Reaction(sent_id, "👍")))
    ids["reaction_removed"] = await sim.inbound(sid, PEER, "", Content(Reaction(
        ids["text"], "")))
    return ids


async def test_every_inbound_kind_arrives_with_its_metadata_and_media_download_exactly(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await asyncio.gather(*(paired_session(app, sim, sid) for sid in SIDS))
    sent = await asyncio.gather(*(client.send(sid, PEER, f"order {sid}") for sid in SIDS))
    ids = {sid: await _inject(sim, sid, n, sent[n].message_id) for n, sid in enumerate(SIDS)}
    expected = sum(len(v) for v in ids.values())
    got: dict[tuple[str, str], InboundMessage] = {}

    async def worker() -> None:
        async for message in client.receive(SIDS, group="content"):
            assert (message.session_id, message.upstream_id) not in got
            got[(message.session_id, message.upstream_id)] = message
            await client.ack_inbound(message.session_id, [message.inbound_id], group="content")

    task = asyncio.create_task(worker())
    try:
        await eventually(lambda: len(got) >= expected, WAIT_S, "every inbound message")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(got) == expected

    for n, sid in enumerate(SIDS):
        m = {name: got[(sid, uid)] for name, uid in ids[sid].items()}
        assert m["text"].body == f"hello {sid}" and not m["text"].HasField("content")

        image = m["image"].content.media
        assert (image.kind, image.mime_type, image.caption, image.size, image.data,
                image.download_error) == (pb.Media.IMAGE, "image/jpeg", f"photo {sid}", BIG,
                                          b"", "")
        assert await client.download_media(sid, ids[sid]["image"]) == generated_media(n, BIG)

        doc = m["document"].content.media
        assert (doc.kind, doc.file_name, doc.caption) == (
            pb.Media.DOCUMENT, f"invoice-{sid}.pdf", "invoice")
        for name, kind, key in (("document", pb.Media.DOCUMENT, "doc"),
                                ("voice", pb.Media.VOICE_NOTE, "ptt"),
                                ("sticker", pb.Media.STICKER, "sticker")):
            assert m[name].content.media.kind == kind
            assert m[name].content.media.size == len(_small(n, key))
            data = await client.download_media(sid, ids[sid][name])
            assert data == _small(n, key) == sim.media(sid, ids[sid][name])

        big = m["too_big"].content.media
        assert (big.kind, big.size) == (pb.Media.VIDEO, MAX_MEDIA + 1)
        assert "--max-media-bytes" in big.download_error
        with pytest.raises(FailedPrecondition) as unavailable:
            await client.download_media(sid, ids[sid]["too_big"])
        assert unavailable.value.reason == "MEDIA_UNAVAILABLE"

        loc = m["location"].content.location
        assert (loc.latitude, loc.longitude, loc.name, loc.address) == (
            52.52 + n, 13.405, "Alexanderplatz", "Berlin")
        assert m["reply"].body == f"about your photo {sid}"
        assert m["reply"].content.reply_to == ids[sid]["image"]
        assert list(m["reply"].content.mentions) == [PEER]
        assert m["reply"].content.WhichOneof("kind") is None
        reaction = m["reaction"].content.reaction
        assert (reaction.message_id, reaction.emoji) == (sent[n].message_id, "👍")
        assert m["reaction_removed"].content.reaction.message_id == ids[sid]["text"]
        assert m["reaction_removed"].content.reaction.emoji == ""


async def test_media_download_is_served_from_the_store_with_the_session_stopped(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await asyncio.gather(*(paired_session(app, sim, sid) for sid in SIDS))
    uids = {sid: await sim.inbound(sid, PEER, "", Content(Media(
        MediaKind.AUDIO, generated_media(n, 70_000 + n), "audio/mpeg")))
        for n, sid in enumerate(SIDS)}
    await eventually(lambda: all(uids[sid] in sim.record(sid).inbound_acked for sid in SIDS),
                     WAIT_S, "every medium stored and acked upstream")
    for sid in SIDS:
        await client.stop_session(sid)
    for n, sid in enumerate(SIDS):
        assert await client.download_media(sid, uids[sid]) == generated_media(n, 70_000 + n)


async def test_bad_downloads_are_typed(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await paired_session(app, sim, SIDS[0])
    text_id = await sim.inbound(SIDS[0], PEER, "just text")
    await eventually(lambda: text_id in sim.record(SIDS[0]).inbound_acked, WAIT_S, "stored")
    for message_id in (text_id, "i-999999"):
        with pytest.raises(SessionNotFound) as missing:
            await client.download_media(SIDS[0], message_id)
        assert missing.value.reason == "MEDIA_NOT_FOUND"
        assert missing.value.metadata["message_id"] == message_id
    with pytest.raises(SessionNotFound) as no_session:
        await client.download_media("nobody", text_id)
    assert no_session.value.reason == "SESSION_NOT_FOUND"
    for bad in ("", "x" * 300, "bad\nid"):
        with pytest.raises(InvalidArgument):
            await client.download_media(SIDS[0], bad)
