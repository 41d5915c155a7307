"""watch_status(): reconnects and resumes from the last event id, bounded per outage."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from broker_client import BrokerClient, PermissionDenied, StatusWatch, Unavailable
from broker_client.v1 import broker_pb2, broker_pb2_grpc

from .fake_broker import END, HANG, ScriptedBroker, StreamStep, event, rich_status

BOUND = 20.0


async def take(watch: StatusWatch, n: int) -> list[broker_pb2.StatusEvent]:
    async def run() -> list[broker_pb2.StatusEvent]:
        return [await watch.__anext__() for _ in range(n)]

    return await asyncio.wait_for(run(), BOUND)


async def test_resumes_after_unavailable_too_slow_and_stream_end(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.stream_script = [
        StreamStep(
            [event("e1"), event("e2")],
            rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
        ),
        StreamStep(
            [event("e3")],
            rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "SUBSCRIBER_TOO_SLOW"),
        ),
        StreamStep([event("e4")], END),
        StreamStep([event("e5")], HANG),
    ]
    watch = client.watch_status(["s1", "s2"], "acme")
    try:
        events = await take(watch, 5)
    finally:
        await watch.aclose()

    assert [e.event_id for e in events] == ["e1", "e2", "e3", "e4", "e5"]
    assert [r.resume_after for r in broker.stream_requests] == ["", "e2", "e3", "e4"]
    assert all(list(r.session_ids) == ["s1", "s2"] for r in broker.stream_requests)
    assert all(r.tenant == "acme" for r in broker.stream_requests)
    assert watch.last_event_id == "e5"
    assert watch.reconnects == 3


async def test_initial_resume_after_and_async_for(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.stream_script = [StreamStep([event("e8"), event("e9")], HANG)]
    watch = client.watch_status(resume_after="e7")
    seen: list[str] = []

    async def consume() -> None:
        async for ev in watch:
            seen.append(ev.event_id)
            if len(seen) == 2:
                await watch.aclose()

    await asyncio.wait_for(consume(), BOUND)
    assert seen == ["e8", "e9"]
    assert broker.stream_requests[0].resume_after == "e7"


async def test_attempts_are_bounded_per_outage(target: str, broker: ScriptedBroker) -> None:
    down = rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    # One event per stream, then failure: each success resets the budget, so
    # four outages of two failures each get through with reconnect_attempts=3...
    broker.stream_script = [
        StreamStep([event("e1")], down),
        StreamStep([], down),
        StreamStep([event("e2")], down),
        StreamStep([], down),
        StreamStep([event("e3")], down),
    ]
    # ...and then a longer outage exhausts it.
    broker.stream_default = StreamStep([], down)
    async with BrokerClient(target, reconnect_attempts=3) as client:
        watch = client.watch_status()
        assert [e.event_id for e in await take(watch, 3)] == ["e1", "e2", "e3"]
        with pytest.raises(Unavailable):
            await asyncio.wait_for(watch.__anext__(), BOUND)
    # e3's stream failed (attempt 1), then 2 more reconnects failed: 3 in that outage.
    assert len(broker.stream_requests) == 5 + 2
    assert broker.stream_requests[-1].resume_after == "e3"
    # A failed watch is closed.
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(watch.__anext__(), BOUND)


async def test_non_retryable_stream_error_is_raised(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.stream_script = [
        StreamStep([], rich_status(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"))
    ]
    watch = client.watch_status()
    with pytest.raises(PermissionDenied):
        await asyncio.wait_for(watch.__anext__(), BOUND)
    assert len(broker.stream_requests) == 1


async def test_survives_broker_restart() -> None:
    """A real server stop/start on the same port: the watch reconnects and resumes."""
    first = ScriptedBroker(stream_script=[StreamStep([event("e1")], HANG)])
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(first, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    second = ScriptedBroker(stream_script=[StreamStep([event("e2")], HANG)])
    restarted = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(second, restarted)
    try:
        async with BrokerClient(f"127.0.0.1:{port}", reconnect_attempts=50, token="t") as client:
            watch = client.watch_status(["s1"])
            assert [e.event_id for e in await take(watch, 1)] == ["e1"]
            await server.stop(grace=None)
            assert restarted.add_insecure_port(f"127.0.0.1:{port}") == port
            await restarted.start()
            assert [e.event_id for e in await take(watch, 1)] == ["e2"]
            await watch.aclose()
        assert second.stream_requests[0].resume_after == "e1"
        assert list(second.stream_requests[0].session_ids) == ["s1"]
        assert second.metadata[0]["authorization"] == "Bearer t"
    finally:
        await server.stop(grace=None)
        await restarted.stop(grace=None)
