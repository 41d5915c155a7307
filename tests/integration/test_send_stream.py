"""SendStream and SendBatch on a real broker on loopback, and the Python client's
coalescing of concurrent send() calls onto SendStream: every message keeps what a
unary Send gives it (its idempotency key, FIFO per session, its own deadline, a
typed error of its own, ACKED/QUEUED only once durable), counted at the simulator."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import (
    BrokerClient,
    BrokerError,
    Message,
    NotDeliveredYet,
    SendResult,
    SessionNotFound,
    SyncBrokerClient,
)
from broker_client.errors import InvalidArgument, ResourceExhausted
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.conftest import BrokerFactory
from tests.helpers import paired_session, wait_state

SESSIONS = ["s-a", "s-b", "s-c"]


def item(ref: int, session_id: str, body: str, key: str = "", timeout_ms: int = 0,
         no_wait: bool = False) -> pb.SendItem:
    return pb.SendItem(ref=ref, timeout_ms=timeout_ms, request=pb.SendRequest(
        session_id=session_id, to="+15550100", body=body, idempotency_key=key,
        no_wait=no_wait))


async def stream(address: str, items: list[pb.SendItem],
                 timeout: float = 30) -> dict[int, pb.SendResult]:
    """Write every item at once (no waiting between them), read every result."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BrokerStub(channel)

        async def requests() -> AsyncIterator[pb.SendBatchRequest]:
            for start in range(0, len(items), 7):  # several requests of several items
                yield pb.SendBatchRequest(items=items[start:start + 7])

        call = stub.SendStream(requests(), timeout=timeout)
        return {result.ref: result async for response in call for result in response.results}


async def test_stream_keeps_fifo_per_session_across_interleaved_sessions(
    sim: Simulator, broker: BrokerApp
) -> None:
    for sid in SESSIONS:
        await paired_session(broker, sim, sid)
    items = [item(n, SESSIONS[n % 3], f"{SESSIONS[n % 3]} {n}", key=f"k{n}")
             for n in range(300)]
    results = await stream(broker.address, items)
    assert sorted(results) == list(range(300))
    assert all(r.response.status == pb.ACKED for r in results.values())
    for sid in SESSIONS:
        bodies = [m.body for m in sim.record(sid).accepted]
        assert bodies == [it.request.body for it in items if it.request.session_id == sid]


async def test_fifo_holds_where_accepting_suspends_before_the_outbox(
    sim: Simulator, make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """With a rate limit the broker reads the key (a SQLite read, off the loop)
    before queueing, so items started together would race: each must still wait
    for its predecessor's place."""
    broker = await make_broker(rate_limit=100_000.0, rate_burst=100_000,
                               store_url=f"sqlite://{tmp_path / 'fifo.db'}")
    for sid in SESSIONS:
        await paired_session(broker, sim, sid)
    items = [item(n, SESSIONS[n % 3], f"{SESSIONS[n % 3]} {n}", key=f"k{n}")
             for n in range(300)]
    results = await stream(broker.address, items)
    assert all(r.response.status == pb.ACKED for r in results.values())
    for sid in SESSIONS:
        bodies = [m.body for m in sim.record(sid).accepted]
        assert bodies == [it.request.body for it in items if it.request.session_id == sid]


async def test_stream_idempotency_keys_hold_within_and_across_calls(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "s-a")
    first = await stream(broker.address, [item(1, "s-a", "once", key="dup"),
                                          item(2, "s-a", "once", key="dup")])
    again = await stream(broker.address, [item(7, "s-a", "once", key="dup")])
    ids = {first[1].response.message_id, first[2].response.message_id,
           again[7].response.message_id}
    assert len(ids) == 1
    assert again[7].response.duplicate
    assert [m.body for m in sim.record("s-a").accepted] == ["once"]


async def test_each_bad_item_fails_alone_with_its_typed_reason(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker = await make_broker(max_outbox=3)
    await paired_session(broker, sim, "s-a")
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)  # hold messages queued
    assert await sim.drop("s-a")
    await wait_state(broker, "s-a", State.RECONNECTING)
    items = [item(1, "nope", "x"), item(2, "s-a", ""), item(3, "s-a", "q1", no_wait=True),
             item(4, "s-a", "q2", no_wait=True), item(5, "s-a", "q3", no_wait=True),
             item(6, "s-a", "q4", no_wait=True)]
    results = await stream(broker.address, items)
    assert results[1].error.reason == pb.ErrorReason.SESSION_NOT_FOUND
    assert results[1].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results[2].error.reason == pb.ErrorReason.INVALID_ARGUMENT
    assert results[2].error.metadata["field"] == "body"
    assert [results[n].response.status for n in (3, 4, 5)] == [pb.QUEUED] * 3
    assert results[6].error.reason == pb.ErrorReason.OUTBOX_FULL
    assert results[6].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


async def test_each_item_has_its_own_deadline(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, "s-a")
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    assert await sim.drop("s-a")
    await wait_state(broker, "s-a", State.RECONNECTING)
    results: list[pb.SendResult] = []
    async with grpc.aio.insecure_channel(broker.address) as channel:
        call = pb_grpc.BrokerStub(channel).SendStream(iter([pb.SendBatchRequest(items=[
            item(1, "s-a", "short", key="d1", timeout_ms=200),
            item(2, "s-a", "long", key="d2", timeout_ms=30_000)])]), timeout=60)
        async for response in call:
            results.extend(response.results)
            if any(r.ref == 1 for r in response.results):  # it gave up: the upstream is back
                sim.set_unavailable(503, count=0)
    assert [r.ref for r in results] == [1, 2]
    assert results[0].error.reason == pb.ErrorReason.NOT_DELIVERED_YET
    assert results[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert results[0].error.metadata["message_id"] and results[0].error.retry_after_ms > 0
    assert results[1].response.status == pb.ACKED
    # The first stays queued and is delivered too, in order, once.
    assert [m.body for m in sim.record("s-a").accepted] == ["short", "long"]


async def test_batch_answers_every_item_in_item_order(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, "s-a")
    request = pb.SendBatchRequest(items=[item(9, "s-a", "b1", key="b1"), item(9, "nope", "x"),
                                         item(3, "s-a", "b2", key="b2")])
    async with grpc.aio.insecure_channel(broker.address) as channel:
        response = await pb_grpc.BrokerStub(channel).SendBatch(request, timeout=30)
    assert [r.ref for r in response.results] == [9, 9, 3]
    assert response.results[0].response.status == pb.ACKED
    assert response.results[1].error.reason == pb.ErrorReason.SESSION_NOT_FOUND
    assert [m.body for m in sim.record("s-a").accepted] == ["b1", "b2"]


# -- the Python client ---------------------------------------------------------------


async def test_concurrent_sends_coalesce_onto_one_stream_in_order(
    sim: Simulator, broker: BrokerApp
) -> None:
    for sid in SESSIONS:
        await paired_session(broker, sim, sid)
    async with BrokerClient(broker.address, timeout=30) as client:
        bodies = [f"{SESSIONS[n % 3]} {n}" for n in range(200)]
        results = await asyncio.gather(*(
            client.send(SESSIONS[n % 3], "+15550100", body, idempotency_key=f"c{n}")
            for n, body in enumerate(bodies)))
        stream_ = client._stream
        assert stream_ is not None and stream_.opened == 1  # one SendStream call carried all
    assert all(r.acked for r in results)
    for sid in SESSIONS:
        assert [m.body for m in sim.record(sid).accepted] == \
            [b for b in bodies if b.startswith(sid + " ")]


async def test_send_many_returns_typed_errors_in_place(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, "s-a")
    async with BrokerClient(broker.address, timeout=30) as client:
        out = await client.send_many([Message("s-a", "+15550100", "m1", "k1"),
                                      Message("nope", "+15550100", "m2"),
                                      Message("s-a", "+15550100", "", "k3"),
                                      Message("s-a", "+15550100", "m4", "k4")])
        again = await client.send("s-a", "+15550100", "m1", idempotency_key="k1")
    assert isinstance(out[1], SessionNotFound) and out[1].session_id == "nope"
    assert isinstance(out[2], InvalidArgument) and out[2].metadata["field"] == "body"
    assert not isinstance(out[0], Exception) and not isinstance(out[3], Exception)
    assert again.duplicate and again.message_id == out[0].message_id
    assert [m.body for m in sim.record("s-a").accepted] == ["m1", "m4"]


async def test_client_deadline_on_the_stream_is_not_delivered_yet_then_retry_is_safe(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "s-a")
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    assert await sim.drop("s-a")
    await wait_state(broker, "s-a", State.RECONNECTING)
    async with BrokerClient(broker.address, timeout=0.5, retry_attempts=1) as client:
        with pytest.raises(NotDeliveredYet):
            await client.send("s-a", "+15550100", "late", idempotency_key="late")
        assert client._stream is not None and client._stream.opened == 1
    sim.set_unavailable(503, count=0)
    await wait_state(broker, "s-a", State.OPEN)
    async with BrokerClient(broker.address, timeout=10) as client:
        retried = await client.send("s-a", "+15550100", "late", idempotency_key="late")
    assert retried.duplicate
    assert [m.body for m in sim.record("s-a").accepted] == ["late"]


async def test_opting_out_sends_each_message_with_unary_send(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "s-a")
    async with BrokerClient(broker.address, coalesce=False) as client:
        results = await asyncio.gather(*(
            client.send("s-a", "+15550100", f"u{n}", idempotency_key=f"u{n}")
            for n in range(20)))
        assert client._stream is None
    assert all(r.acked for r in results)
    assert len(sim.record("s-a").accepted) == 20


class _Methods(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Records the method of every unary call the client makes."""

    def __init__(self) -> None:
        self.called: list[str] = []

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        method = details.method
        self.called.append(method.decode() if isinstance(method, bytes) else method)
        return await continuation(details, request)


async def test_send_many_without_coalescing_keeps_list_order_in_send_batch_calls(
    sim: Simulator, broker: BrokerApp
) -> None:
    """Concurrent unary Sends reach the broker in no set order; send_many's promise
    (each session's messages queued in list order) holds only because it sends the
    list with SendBatch: one call here, every message once, FIFO at the upstream."""
    sessions = [f"s-{n}" for n in range(6)]
    for sid in sessions:
        await paired_session(broker, sim, sid)
    messages = [Message(sessions[n % 6], "+15550100", f"{sessions[n % 6]} {n}", f"k{n}")
                for n in range(120)]
    messages.insert(7, Message("nope", "+15550100", "lost", "k-nope"))
    methods = _Methods()
    async with grpc.aio.insecure_channel(
            broker.address, interceptors=[methods]) as channel:  # type: ignore[list-item]
        client = BrokerClient(broker.address, coalesce=False, channel=channel, timeout=30)
        out = await client.send_many(messages)
        again = await client.send_many(messages[:10])  # a retry of the first ten: no resend
    assert methods.called == ["/broker.v1.Broker/SendBatch"] * 2
    assert isinstance(out[7], SessionNotFound) and out[7].session_id == "nope"
    assert all(isinstance(r, SendResult) and r.acked for n, r in enumerate(out) if n != 7)
    assert [r.message_id for r in again if isinstance(r, SendResult)] == \
        [r.message_id for r in out[:10] if isinstance(r, SendResult)]
    for sid in sessions:
        assert [m.body for m in sim.record(sid).accepted] == \
            [m.body for m in messages if m.session_id == sid]


async def test_send_many_without_coalescing_returns_not_delivered_yet_then_a_retry_is_safe(
    sim: Simulator, broker: BrokerApp
) -> None:
    sessions = [f"s-{n}" for n in range(4)]
    for sid in sessions:
        await paired_session(broker, sim, sid)
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    for sid in sessions:
        assert await sim.drop(sid)
        await wait_state(broker, sid, State.RECONNECTING)
    messages = [Message(sessions[n % 4], "+15550100", f"late {n}", f"late-{n}")
                for n in range(24)]
    async with BrokerClient(broker.address, coalesce=False, timeout=0.5,
                            retry_attempts=2) as client:
        out = await client.send_many(messages)
    assert all(isinstance(r, NotDeliveredYet) for r in out), out
    sim.set_unavailable(503, count=0)
    for sid in sessions:
        await wait_state(broker, sid, State.OPEN)
    async with BrokerClient(broker.address, coalesce=False, timeout=30) as client:
        retried = await client.send_many(messages)
    assert all(isinstance(r, SendResult) and r.duplicate for r in retried)
    for sid in sessions:
        assert [m.body for m in sim.record(sid).accepted] == \
            [m.body for m in messages if m.session_id == sid]


async def test_outbox_full_on_the_stream_is_resource_exhausted(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    broker = await make_broker(max_outbox=1)
    await paired_session(broker, sim, "s-a")
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    assert await sim.drop("s-a")
    await wait_state(broker, "s-a", State.RECONNECTING)
    async with BrokerClient(broker.address) as client:
        await client.send("s-a", "+15550100", "q", wait=False)
        with pytest.raises(ResourceExhausted) as err:
            await client.send("s-a", "+15550100", "over", wait=False)
    assert err.value.reason == "OUTBOX_FULL"


async def test_sync_client_sends_from_many_threads_on_one_stream_and_send_many(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, "s-a")

    def work() -> tuple[list[SendResult], list[SendResult | BrokerError], int]:
        with SyncBrokerClient(broker.address, timeout=30) as client, \
                concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(
                lambda n: client.send("s-a", "+15550100", f"t{n}", idempotency_key=f"t{n}"),
                range(64)))
            many = client.send_many([Message("s-a", "+15550100", f"sm{n}", f"sm{n}")
                                     for n in range(10)])
            stream_ = client._client._stream
            return results, many, stream_.opened if stream_ is not None else 0

    results, many, opened = await asyncio.to_thread(work)
    assert all(r.acked for r in results) and opened == 1
    assert all(isinstance(r, SendResult) and r.acked for r in many)
    bodies = [m.body for m in sim.record("s-a").accepted]
    assert sorted(bodies[:64]) == sorted(f"t{n}" for n in range(64))
    assert bodies[64:] == [f"sm{n}" for n in range(10)]  # send_many keeps its order
