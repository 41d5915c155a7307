"""Durable before accepted, on SendStream: a broker process killed (SIGKILL) in the
middle of a stream, on SQLite and on Redis. Every message the stream answered
QUEUED arrives upstream exactly once after a new broker starts on the same store,
and each session's messages arrive in the order they were written; counted at the
simulator (in this process, so its records outlive the brokers)."""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from broker.simulator import Simulator
from broker.store.crypto import generate_key
from broker_client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.cluster.procs import BrokerProcess
from tests.cluster.test_scale_out import pair_all
from tests.helpers import eventually_async
from tests.redis_server import RedisServer, find_redis_server

SESSIONS = [f"st{i}" for i in range(8)]
WAIT_S = 30.0
TOLD_BEFORE_KILL = 200
"""Kill once this many items were answered QUEUED (the stream keeps writing)."""
MAX_ITEMS = 4000


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'broker.db'}"
        return
    if find_redis_server() is None:
        pytest.skip("redis-server not found")
    server = RedisServer(appendonly=True, extra_args=("--appendfsync", "always")).start()
    try:
        yield server.url
    finally:
        server.close()


async def _start(name: str, store_url: str, sim: Simulator, workdir: Path,
                 env: dict[str, str]) -> BrokerProcess:
    proc = BrokerProcess(name, store_url, sim.url, workdir, env, ())
    await asyncio.to_thread(proc.start)
    return proc


async def _stream_until_killed(address: str, proc: BrokerProcess) -> dict[str, list[str]]:
    """Write items of every session, interleaved, in requests of 16, until the broker
    dies under the stream; return each session's message ids answered QUEUED."""
    told: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    answered = asyncio.Event()
    count = [0]

    async def requests() -> AsyncIterator[pb.SendBatchRequest]:
        for start in range(0, MAX_ITEMS, 16):
            yield pb.SendBatchRequest(items=[
                pb.SendItem(ref=n, request=pb.SendRequest(
                    session_id=SESSIONS[n % len(SESSIONS)], to="+15550100", body=f"b{n}",
                    idempotency_key=f"k{n}", no_wait=True))
                for n in range(start, start + 16)])
            await asyncio.sleep(0.002)  # a steady writer, not one burst

    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.BrokerStub(channel).SendStream(requests(), timeout=WAIT_S)

        async def read() -> None:
            async for response in call:
                for result in response.results:
                    assert result.HasField("response"), result
                    assert result.response.status == pb.QUEUED
                    sid = SESSIONS[result.ref % len(SESSIONS)]
                    told[sid].append((result.ref, result.response.message_id))
                    count[0] += 1
                    if count[0] >= TOLD_BEFORE_KILL:
                        answered.set()

        reader = asyncio.create_task(read())
        await asyncio.wait_for(answered.wait(), WAIT_S)
        proc.signal(signal.SIGKILL)  # mid-stream: items still being written and answered
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(reader, WAIT_S)
    assert count[0] < MAX_ITEMS, "the stream ended before the kill: not mid-stream"
    return {sid: [mid for _, mid in sorted(told[sid])] for sid in SESSIONS}


async def test_every_message_answered_queued_arrives_once_in_order_after_a_kill(
    sim: Simulator, store_url: str, tmp_path: Path
) -> None:
    env = {"BROKER_CREDENTIAL_KEYS": "k1:" + generate_key()}
    first = await _start("first", store_url, sim, tmp_path, env)
    second: BrokerProcess | None = None
    try:
        async with BrokerClient(first.address, timeout=WAIT_S) as client:
            for sid in SESSIONS:
                await client.create_session(sid)
            await pair_all(sim, SESSIONS, WAIT_S)

            async def all_open() -> bool:
                return all(s.state == pb.OPEN for s in await client.list_sessions())

            await eventually_async(all_open, WAIT_S, "every session to open")
        sim.set_unavailable(503, count=1_000_000)  # nothing is delivered before the kill
        for sid in SESSIONS:
            await sim.drop(sid)
        told = await _stream_until_killed(first.address, first)
        await asyncio.to_thread(first.wait, WAIT_S)
        assert not any(sim.record(sid).accepted for sid in SESSIONS)

        sim.set_unavailable(503, count=0)
        second = await _start("second", store_url, sim, tmp_path, env)
        async with BrokerClient(second.address, timeout=WAIT_S) as client:
            async def delivered() -> bool:
                return all(s.state == pb.OPEN and s.outbox_depth == 0
                           for s in await client.list_sessions())

            await eventually_async(delivered, WAIT_S, "every outbox to drain")
        for sid in SESSIONS:
            arrived = sim.record(sid).accepted_ids()
            assert len(arrived) == len(set(arrived)), sid  # none twice
            assert set(told[sid]) <= set(arrived), sid  # none told QUEUED is lost
            # FIFO: the session's messages arrive in the order they were written
            # (the stream's bodies carry the item number)
            numbers = [int(m.body[1:]) for m in sim.record(sid).accepted]
            assert numbers == sorted(numbers), sid
            assert arrived[:len(told[sid])] == told[sid], sid
    finally:
        first.close()
        if second is not None:
            second.close()
