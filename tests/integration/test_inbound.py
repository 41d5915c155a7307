"""Inbound messages end to end: simulator -> broker (memory or Redis) -> gRPC workers.

At-least-once hand-off to consumer groups: stored before the upstream ack,
shared by a group's workers, redelivered when a worker dies unacked, never
again once acked, every group gets everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from broker.app import BrokerApp
from broker.simulator import Simulator
from broker.store.redis import RedisStore
from broker.upstream.protocol import Message
from broker_client import BrokerClient, InboundMessage, InboundReceiver, SyncBrokerClient
from broker_client.errors import InvalidArgument, SessionNotFound
from tests.conftest import BrokerFactory
from tests.helpers import eventually, paired_session
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

SID = "962302"
REDELIVER_S = 0.3
WAIT_S = 15.0
"""Bound of every wait that should end much sooner: a broken broker fails, never hangs."""


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("redis-cluster", marks=pytest.mark.redis)])
async def app(
    request: pytest.FixtureRequest, sim: Simulator, make_broker: BrokerFactory
) -> AsyncIterator[BrokerApp]:
    """A broker with a short redelivery delay, on each store."""
    if request.param == "memory":
        yield await make_broker(inbound_redeliver_after_s=REDELIVER_S)
        return
    server: RedisServer | RedisClusterServers = request.getfixturevalue(
        "shared_redis" if request.param == "redis" else "shared_redis_cluster")
    store = RedisStore.from_url(server.url, ephemeral_key=True,
                                inbound_redeliver_after_s=REDELIVER_S)
    yield await make_broker(store=store, inbound_redeliver_after_s=REDELIVER_S)


@pytest.fixture
async def clients(app: BrokerApp) -> AsyncIterator[list[BrokerClient]]:
    """Workers' clients; each has its own channel, so closing one kills only that worker."""
    made: list[BrokerClient] = [BrokerClient(app.address, timeout=WAIT_S) for _ in range(3)]
    yield made
    for client in made:
        await client.close()


async def _next(receiver: InboundReceiver) -> InboundMessage:
    return await asyncio.wait_for(receiver.__anext__(), WAIT_S)


async def _inject(sim: Simulator, *bodies: str) -> list[str]:
    return [await sim.inbound(SID, "+4915112345678", body) for body in bodies]


async def _stored(sim: Simulator, upstream_ids: list[str]) -> None:
    """The broker acks upstream only after storing: wait for those acks."""
    await eventually(lambda: set(upstream_ids) <= set(sim.record(SID).inbound_acked), WAIT_S,
                     "the broker to store and ack the inbound messages")


async def test_a_killed_workers_messages_go_to_the_other(
    app: BrokerApp, sim: Simulator, clients: list[BrokerClient]
) -> None:
    await paired_session(app, sim, SID)
    doomed, survivor = clients[0], clients[1]
    got_doomed: list[InboundMessage] = []
    got_survivor: list[InboundMessage] = []

    async def never_acks() -> None:
        async for message in doomed.receive([SID], group="g", consumer="doomed"):
            got_doomed.append(message)

    async def acks_each() -> None:
        async for message in survivor.receive([SID], group="g", consumer="survivor"):
            got_survivor.append(message)
            await survivor.ack_inbound(SID, [message.inbound_id], group="g")

    worker_doomed = asyncio.create_task(never_acks())
    worker_survivor = asyncio.create_task(acks_each())
    try:
        # Feed messages until the doomed worker holds some, unacked.
        sent: list[str] = []

        def all_delivered() -> bool:
            return len(got_doomed) + len(got_survivor) >= len(sent)

        deadline = time.monotonic() + WAIT_S
        while len(got_doomed) < 2:
            assert time.monotonic() < deadline, "the doomed worker never got a message"
            sent += await _inject(sim, f"m{len(sent)}")
            await eventually(all_delivered, WAIT_S, "the delivery of the message just injected")
        held = {m.upstream_id for m in got_doomed}
        worker_doomed.cancel()
        await asyncio.gather(worker_doomed, return_exceptions=True)
        await doomed.close()
        sent += await _inject(sim, "after-1", "after-2")

        # Nothing is lost: the survivor ends up with every message, once each.
        await eventually(lambda: {m.upstream_id for m in got_survivor} == set(sent), WAIT_S,
                         "every message to reach the surviving worker")
        ids = [m.upstream_id for m in got_survivor]
        assert len(ids) == len(set(ids)), "a message was delivered twice to the survivor"
        for message in got_survivor:
            # Held by the dead worker: redelivered. (One it took server-side while
            # its stream was being torn down would be a redelivery too.)
            assert message.delivery_count >= (2 if message.upstream_id in held else 1), message
            assert message.session_id == SID and message.sender == "+4915112345678"
            assert message.body.startswith(("m", "after-"))
            assert message.received_at.seconds > 0
        await _stored(sim, sent)

        # Nothing acked comes back, even well past the redelivery delay.
        await asyncio.sleep(REDELIVER_S * 3)
        marker = await _inject(sim, "marker")
        await eventually(lambda: got_survivor[-1].upstream_id == marker[0], WAIT_S, "the marker")
        assert [m.upstream_id for m in got_survivor] == ids + marker
    finally:
        worker_doomed.cancel()
        worker_survivor.cancel()
        await asyncio.gather(worker_doomed, worker_survivor, return_exceptions=True)


async def test_messages_received_offline_reach_a_worker_that_connects_later(
    app: BrokerApp, sim: Simulator, clients: list[BrokerClient]
) -> None:
    assert app.manager is not None
    await paired_session(app, sim, SID)
    await app.manager.stop(SID)
    await eventually(lambda: sim.live_connections(SID) == 0, WAIT_S, "the session to go offline")
    sent = await _inject(sim, "while-offline-1", "while-offline-2")
    await app.manager.restart(SID)
    await _stored(sim, sent)  # re-sent by the upstream on ready, stored before any Receive

    receiver = clients[0].receive([SID])  # group "default", created now
    try:
        got = [await _next(receiver) for _ in sent]
    finally:
        await receiver.aclose()
    assert [(m.upstream_id, m.body, m.delivery_count) for m in got] == [
        (sent[0], "while-offline-1", 1), (sent[1], "while-offline-2", 1)]
    assert await clients[0].ack_inbound(SID, [m.inbound_id for m in got]) == 2
    assert await clients[0].ack_inbound(SID, [m.inbound_id for m in got]) == 0


async def test_a_message_resent_after_a_lost_ack_is_delivered_once(
    app: BrokerApp, sim: Simulator, clients: list[BrokerClient]
) -> None:
    await paired_session(app, sim, SID)
    first = await _inject(sim, "once")
    await _stored(sim, first)
    # The broker's ack is lost: the upstream still holds the message and re-sends
    # it on the next ready (the simulator's own re-send path, reached by putting
    # the message back in its inbox).
    sim._inbox.setdefault(SID, {})[first[0]] = Message(
        id=first[0], sender="+4915112345678", body="once", ts=time.time())
    assert await sim.drop(SID)
    await eventually(lambda: sim.record(SID).inbound_acked.count(first[0]) == 2, WAIT_S,
                     "the re-sent message to be acked again")

    receiver = clients[0].receive([SID], group="g")
    try:
        got = await _next(receiver)
        await clients[0].ack_inbound(SID, [got.inbound_id], group="g")
        marker = await _inject(sim, "marker")
        after = await _next(receiver)  # FIFO: a duplicate would come before the marker
    finally:
        await receiver.aclose()
    assert (got.upstream_id, got.delivery_count) == (first[0], 1)
    assert after.upstream_id == marker[0]


async def test_every_group_gets_every_message(
    app: BrokerApp, sim: Simulator, clients: list[BrokerClient]
) -> None:
    await paired_session(app, sim, SID)
    sent = await _inject(sim, "a", "b", "c")
    billing = clients[0].receive([SID], group="billing")
    support = clients[1].receive([SID], group="support")
    try:
        for receiver, client, group in ((billing, clients[0], "billing"),
                                         (support, clients[1], "support")):
            got = [await _next(receiver) for _ in sent]
            assert [m.upstream_id for m in got] == sent
            assert await client.ack_inbound(SID, [m.inbound_id for m in got], group) == 3
    finally:
        await billing.aclose()
        await support.aclose()


async def test_one_stream_receives_from_several_sessions(
    app: BrokerApp, sim: Simulator, clients: list[BrokerClient]
) -> None:
    await paired_session(app, sim, SID)
    await paired_session(app, sim, "other")
    sent = {await sim.inbound(SID, "+1", "to-first"), await sim.inbound("other", "+1", "to-other")}
    receiver = clients[0].receive([SID, "other"])
    try:
        got = [await _next(receiver) for _ in sent]
    finally:
        await receiver.aclose()
    assert {m.upstream_id for m in got} == sent
    assert {m.session_id for m in got} == {SID, "other"}


async def test_at_most_max_unacked_are_out(
    broker: BrokerApp, sim: Simulator
) -> None:
    """Flow control (default redelivery delay, so nothing is reclaimed meanwhile)."""
    await paired_session(broker, sim, SID)
    sent = await _inject(sim, "1", "2", "3")
    async with BrokerClient(broker.address, timeout=WAIT_S) as client:
        receiver = client.receive([SID], max_unacked=2)
        try:
            got = [await _next(receiver), await _next(receiver)]
            pending = asyncio.ensure_future(receiver.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=0.3)
            assert not done, "a third message went out with two unacked"
            await client.ack_inbound(SID, [got[0].inbound_id])
            third = await asyncio.wait_for(pending, WAIT_S)
        finally:
            await receiver.aclose()
    assert [m.upstream_id for m in [*got, third]] == sent


async def test_bad_input(broker: BrokerApp, sim: Simulator) -> None:
    await paired_session(broker, sim, SID)
    async with BrokerClient(broker.address, timeout=WAIT_S) as client:
        cases: list[tuple[InboundReceiver, type[Exception]]] = [
            (client.receive([]), InvalidArgument),
            (client.receive(["ghost"]), SessionNotFound),
            (client.receive([SID, "ghost"]), SessionNotFound),
            (client.receive(["bad id!"]), InvalidArgument),
            (client.receive([SID], group="bad group"), InvalidArgument),
            (client.receive([SID], max_unacked=-1), InvalidArgument),
            (client.receive([f"s{i}" for i in range(101)]), InvalidArgument),
        ]
        for receiver, error in cases:
            with pytest.raises(error):
                await _next(receiver)
        with pytest.raises(SessionNotFound):
            await client.ack_inbound("ghost", ["1-0"])
        with pytest.raises(InvalidArgument):
            await client.ack_inbound(SID, [])
        with pytest.raises(InvalidArgument):
            await client.ack_inbound(SID, ["not-an-id"])
        assert await client.ack_inbound(SID, ["1-0"]) == 0


async def test_blocking_client(broker: BrokerApp, sim: Simulator) -> None:
    await paired_session(broker, sim, SID)
    sent = await _inject(sim, "sync")

    def work() -> tuple[str, int]:
        with SyncBrokerClient(broker.address, timeout=WAIT_S) as client:
            with client.receive([SID], group="sync") as inbox:
                message = next(inbox)
            return message.upstream_id, client.ack_inbound(SID, [message.inbound_id], "sync")

    assert await asyncio.wait_for(asyncio.to_thread(work), WAIT_S) == (sent[0], 1)
