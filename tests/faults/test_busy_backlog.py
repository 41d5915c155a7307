"""Calls that arrive while the broker's loop is busy wait for it, none is dropped.

gRPC core holds calls the application has not taken yet and, past its
`max_pending_requests` (1,000 unless set), cancels new ones at random with a
bare CANCELLED that no client retries. A real broker process (tests.faults.hog)
is kept busy while 2,500 Sends over 16 sessions arrive; every one must get the
broker's own answer, and every message answered QUEUED arrives upstream once,
counted at the simulator.
"""

from __future__ import annotations

import asyncio
import collections
import signal
from pathlib import Path

import grpc

from broker.simulator import Simulator
from broker_client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.cluster.procs import BrokerProcess
from tests.cluster.test_scale_out import all_open, pair_all
from tests.helpers import eventually_async

SESSIONS = [f"busy{i:02d}" for i in range(16)]
CALLS = 2500
BUSY_S = 4.0
WAIT_S = 60.0


async def test_sends_arriving_while_the_loop_is_busy_all_get_the_brokers_answer(
    sim: Simulator, tmp_path: Path
) -> None:
    proc = BrokerProcess("busy", "memory://", sim.url, tmp_path,
                         {"HOG_BUSY_S": str(BUSY_S)}, (),
                         module="tests.faults.hog")
    await asyncio.to_thread(proc.start)
    try:
        async with BrokerClient(proc.address, timeout=WAIT_S) as client:
            for sid in SESSIONS:
                await client.create_session(sid)
            await pair_all(sim, SESSIONS, WAIT_S)
            await eventually_async(lambda: all_open(client, SESSIONS), WAIT_S,
                                   "every session to open")

        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = pb_grpc.BrokerStub(channel)
            await stub.Health(pb.HealthRequest(), timeout=WAIT_S)  # connected before
            proc.signal(signal.SIGUSR1)

            async def busy() -> bool:
                return "hog: busy begins" in proc.log()

            await eventually_async(busy, WAIT_S, "the broker's loop to be busy")
            calls = [stub.Send(pb.SendRequest(
                session_id=SESSIONS[n % len(SESSIONS)], to="+15550100", body=f"b{n}",
                idempotency_key=f"k{n}", no_wait=True), timeout=WAIT_S)
                for n in range(CALLS)]
            answers = asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.5)  # the requests leave this process
            assert "hog: busy ends" not in proc.log(), (
                "the loop was free again before the calls arrived: no backlog was tested")
            results = await answers

        failed = collections.Counter(r.code().name for r in results
                                     if isinstance(r, grpc.aio.AioRpcError))
        assert not failed, f"calls refused while the broker was busy: {dict(failed)}"
        queued: dict[str, set[str]] = collections.defaultdict(set)
        for n, r in enumerate(results):
            assert isinstance(r, pb.SendResponse) and r.status == pb.QUEUED, r
            queued[SESSIONS[n % len(SESSIONS)]].add(r.message_id)

        async def delivered() -> bool:
            return all(set(sim.record(sid).accepted_ids()) >= queued[sid] for sid in SESSIONS)

        await eventually_async(delivered, WAIT_S, "every queued message to arrive upstream")
        for sid in SESSIONS:
            arrived = sim.record(sid).accepted_ids()
            assert len(arrived) == len(set(arrived)) == len(queued[sid]), sid
    finally:
        proc.close()
