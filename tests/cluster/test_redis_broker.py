"""A broker on Redis: durable across Redis and broker restarts, encrypted
credentials, resumable status across instances, self-fencing."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from broker.app import BrokerApp
from broker.config import Settings
from broker.lifecycle.states import State
from broker.runtime.actor import SessionActor
from broker.simulator import Simulator
from broker.store.base import SessionRecord
from broker.store.memory import MemoryStore
from broker.upstream.websocket import WebsocketProvider
from broker_client import BrokerClient, BrokerError
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.conftest import RedisTarget
from tests.conftest import BrokerFactory
from tests.helpers import (
    FAST_POLICY,
    eventually,
    eventually_async,
    paired_session,
    state_of,
    wait_state,
)
from tests.redis_server import RedisServer

SID = "962302"


@pytest.fixture
async def redis_broker(
    make_broker: BrokerFactory, redis_server: RedisServer, credential_env: dict[str, str]
) -> BrokerFactory:
    async def factory(**overrides: object) -> BrokerApp:
        settings: dict[str, object] = {"store_url": redis_server.url, "lease_ttl_s": 2.0}
        return await make_broker(**(settings | overrides))

    return factory


@pytest.fixture
async def shared_broker(
    make_broker: BrokerFactory, redis_target: RedisTarget, credential_env: dict[str, str]
) -> BrokerFactory:
    """Brokers on one redis-server or on the 3-primary cluster (both, by parameter)."""

    async def factory(**overrides: object) -> BrokerApp:
        settings: dict[str, object] = {"store_url": redis_target.url, "lease_ttl_s": 2.0}
        return await make_broker(**(settings | overrides))

    return factory


async def test_redis_restart_loses_nothing_accepted(
    sim: Simulator, redis_server: RedisServer, redis_broker: BrokerFactory
) -> None:
    app = await redis_broker()
    await paired_session(app, sim, SID)
    # The upstream refuses reconnects for now, so accepted messages wait in Redis.
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    await sim.drop(SID)
    await wait_state(app, SID, State.RECONNECTING)
    async with BrokerClient(app.address, timeout=5, retry_attempts=1) as client:
        queued = [await client.send(SID, "+15550100", f"q{n}", wait=False) for n in range(20)]
        redis_server.stop()  # clean shutdown: the append-only file is flushed
        with pytest.raises(BrokerError) as err:
            await client.send(SID, "+15550100", "while redis is down")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        redis_server.start()
        sim.set_unavailable(503, count=0)
        await wait_state(app, SID, State.OPEN, timeout=30)
        after = await client.send(SID, "+15550100", "after restart")
    assert after.acked
    await eventually(lambda: len(sim.record(SID).accepted) == 21, 30, "the queued messages")
    assert [m.id for m in sim.record(SID).accepted] == [
        *(q.message_id for q in queued), after.message_id
    ]


async def test_restarted_broker_reuses_encrypted_credentials(
    sim: Simulator, redis_server: RedisServer, redis_broker: BrokerFactory
) -> None:
    first = await redis_broker()
    await paired_session(first, sim, SID)
    assert first.manager is not None
    token = (await first.manager.store.load_credentials(SID) or {})["token"]
    qr_codes = sim.record(SID).qr_codes_sent
    await first.stop()

    second = await redis_broker()
    await wait_state(second, SID, State.OPEN, timeout=20)
    assert sim.record(SID).qr_codes_sent == qr_codes, "no new pairing"
    raw = aioredis.Redis.from_url(redis_server.url)
    stored = await raw.get(f"broker:{{s:{SID}}}:creds")
    await raw.aclose()
    assert stored and token.encode() not in stored and b"token" not in stored


async def test_stream_status_resumes_on_another_instance(
    sim: Simulator, shared_broker: BrokerFactory
) -> None:
    a = await shared_broker(instance_id="a")
    b = await shared_broker(instance_id="b")
    async with BrokerClient(a.address) as client:
        await client.create_session(SID)
    owner = await _owner(a, b)
    await wait_state(owner, SID, State.PAIRING)
    assert await sim.scan(SID)
    await wait_state(owner, SID, State.OPEN)

    async with BrokerClient(a.address) as on_a:
        watch = on_a.watch_status([SID])
        snapshot = await anext(watch)
        await watch.aclose()
    assert snapshot.snapshot and snapshot.state == pb.OPEN
    assert await sim.drop(SID)  # missed by the dashboard
    await eventually(lambda: sim.record(SID).connection_attempts >= 3)
    await wait_state(owner, SID, State.OPEN)

    missed: list[pb.StatusEvent] = []
    async with BrokerClient(b.address) as on_b:
        resumed = on_b.watch_status([SID], resume_after=snapshot.event_id)
        while len(missed) < 3:
            missed.append(await asyncio.wait_for(anext(resumed), 10))
        await resumed.aclose()
    assert [pb.SessionState.Name(e.state) for e in missed] == ["RECONNECTING", "CONNECTING", "OPEN"]
    assert [e.sequence for e in missed] == [snapshot.sequence + i for i in (1, 2, 3)]
    assert not any(e.snapshot for e in missed)


async def test_owner_that_cannot_renew_closes_its_upstream(
    sim: Simulator, redis_server: RedisServer, redis_broker: BrokerFactory
) -> None:
    """Redis stops answering: the owner aborts every session's upstream connection
    (all of them, not one after another), and opens none until it renews again."""
    sids = [f"r{i:02d}" for i in range(10)]
    app = await redis_broker()
    for sid in sids:
        await paired_session(app, sim, sid)
    attempts = {sid: sim.record(sid).connection_attempts for sid in sids}
    redis_server.freeze()
    try:
        await eventually(lambda: all(sim.live_connections(s) == 0 for s in sids), 10,
                         "the owner to drop every upstream connection")
        assert all(state_of(app, sid) is None for sid in sids)  # gone, not reconnecting
        # A window in which a broker that trusted its stale leases would reconnect.
        await asyncio.sleep(1.0)
        assert {sid: sim.record(sid).connection_attempts for sid in sids} == attempts
    finally:
        redis_server.thaw()
    for sid in sids:
        await wait_state(app, sid, State.OPEN, timeout=20)
        assert sim.record(sid).max_concurrent == 1


async def test_actor_never_connects_without_a_fresh_lease(sim: Simulator) -> None:
    """A stale lease stops the actor before any I/O, and records nothing: losing a
    lease is the broker's business, so no STOPPED reaches the session's history."""
    store = MemoryStore()
    record = SessionRecord(SID, "default")
    await store.create_session(record)
    fenced: list[str] = []
    actor = SessionActor(
        record, store=store, provider=WebsocketProvider(sim.url),
        settings=Settings(lifecycle=FAST_POLICY), fence=await store.new_fence(SID),
        may_connect=lambda _sid: False, on_fenced=fenced.append,
    )
    await actor.start()
    from broker.lifecycle import inputs

    await actor.command(inputs.Start())
    await eventually(lambda: fenced == [SID])
    assert actor.fenced
    assert sim.record(SID).connection_attempts == 0
    last = await store.last_event(SID)
    assert last is None or last.state != State.STOPPED
    await actor.shutdown()


async def _owner(*apps: BrokerApp) -> BrokerApp:
    found: list[BrokerApp] = []

    def claimed() -> bool:
        found[:] = [a for a in apps if a.manager is not None and SID in a.manager.actors]
        return len(found) == 1

    await eventually(claimed, 10, "one instance to claim the session")
    return found[0]


async def test_health_on_any_instance_shows_the_owner_and_live_state(
    sim: Simulator, shared_broker: BrokerFactory
) -> None:
    a = await shared_broker(instance_id="a")
    b = await shared_broker(instance_id="b")
    async with BrokerClient(a.address) as client:
        await client.create_session(SID)
    owner = await _owner(a, b)
    other = b if owner is a else a
    await wait_state(owner, SID, State.PAIRING)
    assert await sim.scan(SID)
    await wait_state(owner, SID, State.OPEN)
    assert other.manager is not None and owner.manager is not None
    owner_id = owner.settings.instance_id

    async def reported() -> bool:
        live = await other.manager.store.get_live(SID) if other.manager else None
        return live is not None and live.state == State.OPEN

    await eventually_async(reported, 10, "the owner to report live state")
    async with BrokerClient(other.address) as client:
        [health] = await client.health([SID])
    assert health.owner == owner_id
    assert health.live_state == pb.OPEN
    assert health.last_activity.seconds > 0
    # A graceful stop hands the session to the other instance at once.
    await owner.stop()
    await eventually(lambda: SID in other.manager.actors if other.manager else False, 20)
