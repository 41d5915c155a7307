"""Per-message status updates end to end: simulator -> broker (each store) -> gRPC
workers (ReceiveUpdates / AckUpdates), GetMessage, Health's delivered rate, and
refusals on the simulator. Many sessions: a bug that mixes sessions up shows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.app import BrokerApp
from broker.simulator import Simulator
from broker_client import BrokerClient, MessageRefused, MessageUpdate
from broker_client.errors import InvalidArgument, SessionNotFound
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

SIDS = [f"u{i}" for i in range(6)]
REDELIVER_S = 0.3
WAIT_S = 15.0
"""Bound of every wait that should end much sooner: a broken broker fails, never hangs."""
IN_ORDER = [pb.MESSAGE_SERVER_ACK, pb.MESSAGE_DELIVERED, pb.MESSAGE_READ]


@pytest.fixture(params=STORES)
async def app(request: pytest.FixtureRequest, make_broker: BrokerFactory,
              tmp_path: Path) -> BrokerApp:
    return await broker_on_store(
        request, make_broker, tmp_path, inbound_redeliver_after_s=REDELIVER_S,
        store_options={"inbound_redeliver_after_s": REDELIVER_S})


@pytest.fixture
async def client(app: BrokerApp) -> AsyncIterator[BrokerClient]:
    made = BrokerClient(app.address, timeout=WAIT_S)
    yield made
    await made.close()


async def _pair_all(app: BrokerApp, sim: Simulator) -> None:
    await asyncio.gather(*(paired_session(app, sim, sid) for sid in SIDS))


def _by_message(updates: list[MessageUpdate]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for u in updates:
        out.setdefault(u.message_id, []).append(u.status)
    return out


async def test_a_worker_sees_ack_delivered_read_in_order_once_and_get_message_follows(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await _pair_all(app, sim)
    results = await asyncio.gather(*(client.send(sid, "+4915112345678", f"order {sid}")
                                     for sid in SIDS))
    mids = {sid: r.message_id for sid, r in zip(SIDS, results, strict=True)}
    got: list[MessageUpdate] = []

    async def worker() -> None:
        async for update in client.receive_updates(SIDS, group="receipts"):
            got.append(update)
            await client.ack_updates(update.session_id, [update.update_id], group="receipts")

    task = asyncio.create_task(worker())
    try:
        await eventually(lambda: all(_by_message(got).get(m) == IN_ORDER[:1]
                                     for m in mids.values()), WAIT_S, "every server ack")
        # The recipients' phones (this simulator sends no receipts by itself).
        for sid, mid in mids.items():
            assert await sim.receipt(sid, mid, "delivered")
            assert await sim.receipt(sid, mid, "read")
            assert await sim.receipt(sid, mid, "read")  # a repeated receipt is stored once
        await eventually(lambda: all(_by_message(got).get(m) == IN_ORDER
                                     for m in mids.values()), WAIT_S, "every read receipt")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for update in got:
        assert mids[update.session_id] == update.message_id, update
        assert update.delivery_count == 1 and update.at.seconds > 0
    for sid, mid in mids.items():
        info = await client.get_message(sid, mid)
        assert (info.status, info.to, info.sequence) == (pb.MESSAGE_READ, "+4915112345678", 1)
        assert info.status_at.ToNanoseconds() >= info.accepted_at.ToNanoseconds() > 0
    # Acknowledged: a new worker of the group gets nothing again; another group gets all.
    again: list[MessageUpdate] = []

    async def other_group() -> None:
        async for update in client.receive_updates(SIDS, group="audit"):
            again.append(update)

    task = asyncio.create_task(other_group())
    try:
        await eventually(lambda: len(again) == len(got), WAIT_S, "the other group's copy")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert _by_message(again) == _by_message(got)
    health = {h.session.session_id: h.counters for h in await client.health(SIDS)}
    for sid in SIDS:
        assert health[sid].messages_delivered == 1, sid
        assert health[sid].delivered_rate_last_hour == 1.0, sid


async def test_a_crashed_workers_updates_are_redelivered(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await _pair_all(app, sim)
    doomed = BrokerClient(app.address, timeout=WAIT_S)
    held: list[MessageUpdate] = []

    async def never_acks() -> None:
        async for update in doomed.receive_updates(SIDS, group="g", consumer="doomed"):
            held.append(update)

    crash = asyncio.create_task(never_acks())
    try:
        for sid in SIDS:
            await client.send(sid, "+4915112345678", f"crash {sid}")
        await eventually(lambda: len(held) >= len(SIDS), WAIT_S, "the doomed worker's share")
    finally:
        crash.cancel()
        await asyncio.gather(crash, return_exceptions=True)
        await doomed.close()
    survivor: list[MessageUpdate] = []

    async def acks_each() -> None:
        async for update in client.receive_updates(SIDS, group="g", consumer="survivor"):
            survivor.append(update)
            await client.ack_updates(update.session_id, [update.update_id], group="g")

    task = asyncio.create_task(acks_each())
    try:
        await eventually(lambda: {u.update_id for u in held} <= {u.update_id for u in survivor},
                         WAIT_S, "every held update at the survivor")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    redelivered = {u.update_id for u in held}
    assert all(u.delivery_count >= 2 for u in survivor if u.update_id in redelivered)


async def test_a_refusal_fails_the_send_and_is_the_messages_last_status(
    app: BrokerApp, sim: Simulator, client: BrokerClient
) -> None:
    await _pair_all(app, sim)
    refused = SIDS[::2]
    for sid in refused:
        sim.refuse_next(sid, 463, "no privacy token")
    outcomes = await asyncio.gather(
        *(client.send(sid, "+4915112345678", f"maybe {sid}", idempotency_key=f"k-{sid}")
          for sid in SIDS), return_exceptions=True)
    for sid, outcome in zip(SIDS, outcomes, strict=True):
        if sid in refused:
            assert isinstance(outcome, MessageRefused), (sid, outcome)
            assert outcome.metadata["code"] == "463"
            info = await client.get_message(sid, outcome.metadata["message_id"])
            assert (info.status, info.code, info.reason) == (
                pb.MESSAGE_REFUSED, 463, "no privacy token")
            assert sim.record(sid).refused == [outcome.metadata["message_id"]]
            assert sim.record(sid).accepted == []  # never resent
        else:
            assert not isinstance(outcome, BaseException) and outcome.acked, (sid, outcome)
    # The refused sessions are not stuck: their next message is taken.
    for sid in refused:
        assert (await client.send(sid, "+4915112345678", "next one")).acked


async def test_bad_lookups_are_typed(app: BrokerApp, sim: Simulator, client: BrokerClient) -> None:
    await paired_session(app, sim, SIDS[0])
    with pytest.raises(SessionNotFound) as missing:
        await client.get_message(SIDS[0], "m-never-sent")
    assert missing.value.reason == "MESSAGE_NOT_FOUND"
    with pytest.raises(SessionNotFound) as no_session:
        await client.get_message("no-such-session", "m-1")
    assert no_session.value.reason == "SESSION_NOT_FOUND"
    with pytest.raises(InvalidArgument):
        await client.get_message(SIDS[0], "")
    with pytest.raises(InvalidArgument):
        await client.ack_updates(SIDS[0], ["not-an-id"])
