"""StreamStatus: snapshot first, then every transition in order; resumable;
a subscriber that never reads slows nobody down."""

from __future__ import annotations

import asyncio
from functools import partial

import grpc

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers import FAST_POLICY, eventually, paired_session, wait_state

SID = "962302"


async def test_snapshot_then_drop_and_reconnect_cycle(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, SID)
    events: list[pb.StatusEvent] = []
    async with BrokerClient(broker.address) as client:

        async def watch() -> None:
            async for event in client.watch_status([SID]):
                events.append(event)
                if len(events) >= 5:
                    return

        watcher = asyncio.create_task(watch())
        await eventually(lambda: len(events) == 1, what="the snapshot")
        assert await sim.drop(SID)
        await asyncio.wait_for(watcher, 10)

    snapshot, *live = events
    assert snapshot.snapshot and snapshot.state == pb.OPEN
    assert [pb.SessionState.Name(e.state) for e in live] == [
        "RECONNECTING", "CONNECTING", "OPEN", *(["RECONNECTING"] if len(live) > 3 else [])
    ][: len(live)]
    # Full jitter may pick a delay under 1 ms; the bound is the policy's cap.
    assert live[0].code == 428
    assert 0 <= live[0].retry_in_ms <= FAST_POLICY.backoff_max_s * 1000
    sequences = [snapshot.sequence, *(e.sequence for e in live)]
    assert sequences == list(range(snapshot.sequence, snapshot.sequence + len(sequences)))


async def test_resume_after_replays_exactly_the_missed_events(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    async with BrokerClient(broker.address) as client:
        stream = client.watch_status([SID])
        snapshot = await anext(stream)
        await stream.aclose()
        assert await sim.drop(SID)  # happens while nobody watches
        await eventually(lambda: sim.record(SID).connection_attempts >= 2)
        await wait_state(broker, SID, State.OPEN)
        missed: list[pb.StatusEvent] = []
        resumed = client.watch_status([SID], resume_after=snapshot.event_id)
        while len(missed) < 3:
            missed.append(await asyncio.wait_for(anext(resumed), 5))
        await resumed.aclose()
    assert not any(e.snapshot for e in missed)
    assert [e.sequence for e in missed] == [snapshot.sequence + i for i in (1, 2, 3)]
    assert [pb.SessionState.Name(e.state) for e in missed] == ["RECONNECTING", "CONNECTING", "OPEN"]


async def test_a_subscriber_that_never_reads_delays_nobody(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    channel = grpc.aio.insecure_channel(broker.address)
    stalled = pb_grpc.BrokerStub(channel).StreamStatus(pb.StreamStatusRequest())
    await stalled.wait_for_connection()  # opened, never read
    try:
        seen: list[pb.StatusEvent] = []
        async with BrokerClient(broker.address) as client:

            async def watch() -> None:
                async for event in client.watch_status([SID]):
                    seen.append(event)

            watcher = asyncio.create_task(watch())
            await eventually(lambda: len(seen) == 1)
            for round_ in range(20):
                assert await sim.drop(SID)
                await eventually(partial(_opens_at_least, seen, round_ + 2))
                result = await client.send(SID, "+15550100", f"during stall {round_}")
                assert result.acked
            watcher.cancel()
        assert sum(e.state == pb.RECONNECTING for e in seen) == 20
    finally:
        stalled.cancel()
        await channel.close(None)


def _opens_at_least(events: list[pb.StatusEvent], count: int) -> bool:
    return sum(e.state == pb.OPEN for e in events) >= count
