"""The typed content helpers of both Python clients: each sends the Content it
promises (media bytes intact, past gRPC's default 4 MiB message limit), and
send_presence maps names to the enum and is never retried."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from broker_client import BrokerClient, SyncBrokerClient, Unavailable
from broker_client import content as c
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc

from .fake_broker import Context, ScriptedBroker, rich_status

BOUND = 20.0
TO = "+4915123456789"
BIG = bytes(range(256)) * (6 * 1024 * 4)  # 6 MiB


@pytest.fixture
async def big_target(broker: ScriptedBroker) -> AsyncIterator[str]:
    """The scripted broker with the broker's message size limits (a real one raises them
    to fit --max-media-bytes)."""
    limit = c.MAX_MESSAGE_BYTES
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", limit)])
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def _expected() -> list[pb.Content]:
    return [
        pb.Content(media=pb.Media(kind=pb.Media.IMAGE, data=BIG, mime_type="image/png",
                                  caption="cap"), reply_to="m-1", mentions=["+1555"]),
        pb.Content(media=pb.Media(kind=pb.Media.VIDEO, data=b"v", mime_type="video/mp4")),
        pb.Content(media=pb.Media(kind=pb.Media.VOICE_NOTE, data=b"a",
                                  mime_type="audio/ogg; codecs=opus")),
        pb.Content(media=pb.Media(kind=pb.Media.AUDIO, data=b"a", mime_type="audio/mpeg")),
        pb.Content(media=pb.Media(kind=pb.Media.DOCUMENT, data=b"d", mime_type="application/pdf",
                                  caption="c", file_name="a.pdf")),
        pb.Content(media=pb.Media(kind=pb.Media.STICKER, data=b"s", mime_type="image/webp")),
        pb.Content(location=pb.Location(latitude=1.5, longitude=-2.5, name="n", address="a")),
        pb.Content(reaction=pb.Reaction(message_id="m-2", emoji="x", from_me=True)),
        pb.Content(text="hi", reply_to="m-3", mentions=["+1666"]),
    ]


async def test_each_helper_sends_its_content(big_target: str, broker: ScriptedBroker) -> None:
    async with BrokerClient(big_target, timeout=10.0) as client:
        await asyncio.wait_for(asyncio.gather(
            client.send_image("s1", TO, BIG, "image/png", caption="cap", reply_to="m-1",
                              mentions=["+1555"], idempotency_key="k-image"),
            client.send_video("s1", TO, b"v"),
            client.send_audio("s1", TO, b"a", voice=True),
            client.send_audio("s1", TO, b"a", "audio/mpeg"),
            client.send_document("s1", TO, b"d", "application/pdf", "a.pdf", caption="c"),
            client.send_sticker("s1", TO, b"s"),
            client.send_location("s1", TO, 1.5, -2.5, name="n", address="a"),
            client.send_reaction("s1", TO, "m-2", "x", from_me=True),
            client.send_text("s1", TO, "hi", reply_to="m-3", mentions=["+1666"]),
        ), BOUND)
        await client.send_presence("s1", TO, "Composing")
        await client.send_presence("s1", "123@g.us", pb.PAUSED)
        with pytest.raises(ValueError, match="presence must be one of"):
            await client.send_presence("s1", TO, "dancing")
    sent = {r.content.SerializeToString(deterministic=True): r for r in broker.send_requests}
    for want in _expected():
        request = sent[want.SerializeToString(deterministic=True)]
        assert request.body == "" and request.to == TO and request.idempotency_key
    assert len(broker.send_requests) == 9
    assert [(p.chat, p.presence) for p in broker.presence_requests] == [
        (TO, pb.COMPOSING), ("123@g.us", pb.PAUSED)]


async def test_presence_is_not_retried(big_target: str, broker: ScriptedBroker) -> None:
    broker.unary_error = rich_status(grpc.StatusCode.UNAVAILABLE, "SESSION_NOT_OPEN",
                                     "not open", metadata={"state": "RECONNECTING"})
    async with BrokerClient(big_target, timeout=10.0, retry_attempts=5) as client:
        with pytest.raises(Unavailable) as err:
            await asyncio.wait_for(client.send_presence("s1", TO, "composing"), BOUND)
    assert err.value.reason == "SESSION_NOT_OPEN"
    assert len(broker.presence_requests) == 1


async def test_the_sync_client_has_the_same_helpers(
    big_target: str, broker: ScriptedBroker
) -> None:
    def work() -> None:
        with SyncBrokerClient(big_target, timeout=10.0) as client:
            client.send_image("s1", TO, BIG, "image/png", caption="cap", reply_to="m-1",
                              mentions=["+1555"])
            client.send_video("s1", TO, b"v")
            client.send_audio("s1", TO, b"a", voice=True)
            client.send_audio("s1", TO, b"a", "audio/mpeg")
            client.send_document("s1", TO, b"d", "application/pdf", "a.pdf", caption="c")
            client.send_sticker("s1", TO, b"s")
            client.send_location("s1", TO, 1.5, -2.5, name="n", address="a")
            client.send_reaction("s1", TO, "m-2", "x", from_me=True)
            client.send_text("s1", TO, "hi", reply_to="m-3", mentions=["+1666"])
            client.send("s1", TO, "plain", content=None)
            client.send_presence("s1", TO, "recording")

    await asyncio.wait_for(asyncio.to_thread(work), BOUND)
    got = [r.content for r in broker.send_requests]
    assert got[:9] == _expected()
    assert not broker.send_requests[9].HasField("content")
    assert broker.send_requests[9].body == "plain"
    assert [p.presence for p in broker.presence_requests] == [pb.RECORDING]


class _StreamingBroker(ScriptedBroker):
    """A broker with SendStream that answers every item and records each request's size."""

    def __init__(self) -> None:
        super().__init__()
        self.request_sizes: list[int] = []

    async def SendStream(
        self, request_iterator: AsyncIterator[pb.SendBatchRequest], context: Context
    ) -> AsyncIterator[pb.SendBatchResponse]:
        async for request in request_iterator:
            self.request_sizes.append(request.ByteSize())
            yield pb.SendBatchResponse(results=[
                pb.SendResult(ref=item.ref, response=pb.SendResponse(
                    message_id=f"msg-{item.request.idempotency_key}", status=pb.ACKED))
                for item in request.items])


async def test_coalesced_media_are_split_into_requests_that_fit() -> None:
    broker = _StreamingBroker()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 5 * 1024 * 1024)])
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    images = [bytes([n]) * (900 * 1024) for n in range(8)]
    try:
        async with BrokerClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            results = await asyncio.wait_for(asyncio.gather(*(
                client.send_image("s1", TO, image, idempotency_key=f"i{n}")
                for n, image in enumerate(images))), BOUND)
            # Small messages still travel together.
            await asyncio.wait_for(asyncio.gather(*(client.send("s1", TO, f"t{n}")
                                                    for n in range(50))), BOUND)
    finally:
        await server.stop(grace=None)
    assert [r.message_id for r in results] == [f"msg-i{n}" for n in range(8)]
    assert broker.send_requests == [], "all on the stream: none fell back to unary Send"
    assert len(broker.request_sizes) >= 8
    assert max(broker.request_sizes) < 2 * 1024 * 1024
    assert len(broker.request_sizes) < 8 + 50, "small items share requests"
