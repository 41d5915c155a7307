"""Per-session send rate limits (token bucket) and the outbox cap, both with RetryInfo."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.runtime.ratelimit import LocalLimiter, RedisLimiter, TokenBucket, Unlimited
from broker.simulator import Simulator
from broker.store.crypto import generate_key
from broker.store.redis import RedisStore
from broker_client import BrokerClient, BrokerError
from tests import redis_server as redis_fixtures
from tests.conftest import BrokerFactory
from tests.helpers import eventually, paired_session, wait_state

redis_server = redis_fixtures.redis_server
SID, OTHER = "962302", "777"
TO = "+15550100"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NO_REFILL = 0.0001
"""Messages per second so low that no token comes back during a test."""


def client_for(app: BrokerApp) -> BrokerClient:
    return BrokerClient(app.address, timeout=10, retry_attempts=1)


async def rate_limited(client: BrokerClient, sid: str, body: str) -> BrokerError:
    with pytest.raises(BrokerError) as caught:
        await client.send(sid, TO, body)
    err = caught.value
    assert (err.code, err.reason) == (EXHAUSTED, "RATE_LIMITED"), repr(err)
    assert err.retry_after is not None and err.retry_after > 0
    return err


async def test_a_burst_over_the_limit_is_refused_and_never_reaches_the_upstream(
    make_broker: BrokerFactory, sim: Simulator
) -> None:
    app = await make_broker(rate_limit=NO_REFILL, rate_burst=3)
    await paired_session(app, sim, SID)
    await paired_session(app, sim, OTHER)
    async with client_for(app) as client:
        sent = [await client.send(SID, TO, f"m{n}", idempotency_key=f"k{n}") for n in range(3)]
        assert all(r.acked for r in sent)
        errors = [await rate_limited(client, SID, f"over{n}") for n in range(5)]
        # About 1/rate seconds until the next token: the delay says how long, honestly.
        assert all(e.retry_after is not None and e.retry_after > 60 for e in errors)
        # A retry of an accepted message is not a new message: no token needed.
        again = await client.send(SID, TO, "m0", idempotency_key="k0")
        assert again.duplicate and again.message_id == sent[0].message_id
        # Buckets are per session.
        assert (await client.send(OTHER, TO, "other")).acked
    assert [m.body for m in sim.record(SID).accepted] == ["m0", "m1", "m2"]
    assert app.manager is not None
    assert await app.manager.store.outbox_depth(SID) == 0


async def test_no_limit_by_default(make_broker: BrokerFactory, sim: Simulator) -> None:
    app = await make_broker()
    assert app.manager is not None and isinstance(app.manager.limiter, Unlimited)
    await paired_session(app, sim, SID)
    async with client_for(app) as client:
        for n in range(20):
            await client.send(SID, TO, f"m{n}", wait=False)
    await eventually(lambda: len(sim.record(SID).accepted) == 20, 10, "every message")


async def test_outbox_full_answers_with_a_retry_delay(
    make_broker: BrokerFactory, sim: Simulator
) -> None:
    app = await make_broker(max_outbox=2)
    await paired_session(app, sim, SID)
    # The upstream refuses reconnects, so accepted messages wait in the outbox.
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    assert await sim.drop(SID)
    await wait_state(app, SID, State.RECONNECTING)
    async with client_for(app) as client:
        for n in range(2):
            await client.send(SID, TO, f"q{n}", wait=False)
        with pytest.raises(BrokerError) as caught:
            await client.send(SID, TO, "one too many", wait=False)
        sim.set_unavailable(503, count=0)
    err = caught.value
    assert (err.code, err.reason) == (EXHAUSTED, "OUTBOX_FULL"), repr(err)
    assert err.retry_after is not None and err.retry_after > 0
    await eventually(lambda: len(sim.record(SID).accepted) == 2, 20, "the queued messages")
    assert [m.body for m in sim.record(SID).accepted] == ["q0", "q1"]


async def test_local_bucket_refills_at_the_rate() -> None:
    now = [100.0]
    limiter = LocalLimiter(TokenBucket(rate=10, burst=2), clock=lambda: now[0])
    assert [await limiter.acquire("s") for _ in range(2)] == [0.0, 0.0]
    assert await limiter.acquire("s") == pytest.approx(0.1)
    assert await limiter.acquire("other") == 0.0
    now[0] += 0.05
    assert await limiter.acquire("s") == pytest.approx(0.05)
    now[0] += 0.05
    assert await limiter.acquire("s") == 0.0
    now[0] += 1000
    assert [await limiter.acquire("s") for _ in range(3)][-1] > 0  # capped at burst


def test_burst_defaults_to_one_second() -> None:
    assert TokenBucket.from_settings(0, 0) is None
    assert TokenBucket.from_settings(2.5, 0) == TokenBucket(2.5, 3)
    assert TokenBucket.from_settings(0.1, 0) == TokenBucket(0.1, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, 0)


@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=60),
)
def test_bucket_never_admits_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst)
    tokens, admitted, elapsed = float(burst), 0, 0.0
    for gap in gaps:
        elapsed += gap
        tokens, wait = bucket.take(tokens, gap)
        admitted += wait == 0.0
        assert wait >= 0.0
    assert admitted <= burst + rate * elapsed + 1e-6


@pytest.fixture
def credential_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_CREDENTIAL_KEYS", "k1:" + generate_key())


@pytest.mark.redis
async def test_redis_limiters_share_one_bucket(
    redis_server: redis_fixtures.RedisServer, credential_env: None
) -> None:
    bucket = TokenBucket(NO_REFILL, 3)
    stores = [RedisStore.from_url(redis_server.url) for _ in range(2)]
    try:
        first, second = (RedisLimiter(s.client, s.keys, bucket) for s in stores)
        waits = [await first.acquire(SID), await second.acquire(SID), await first.acquire(SID)]
        assert waits == [0.0, 0.0, 0.0]
        assert await second.acquire(SID) > 60
        assert await first.acquire(SID) > 60
        assert await second.acquire(OTHER) == 0.0
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await raw.exists(f"broker:{{s:{SID}}}:rate")
            assert await raw.pttl(f"broker:{{s:{SID}}}:rate") > 0
        finally:
            await raw.aclose()
    finally:
        for store in stores:
            await store.close()


@pytest.mark.redis
async def test_two_broker_instances_share_the_session_bucket(
    make_broker: BrokerFactory, sim: Simulator, redis_server: redis_fixtures.RedisServer,
    credential_env: None,
) -> None:
    shared = {"store_url": redis_server.url, "lease_ttl_s": 2.0, "rate_limit": NO_REFILL,
              "rate_burst": 4}
    a = await make_broker(instance_id="a", **shared)
    b = await make_broker(instance_id="b", **shared)
    assert all(isinstance(x.manager.limiter, RedisLimiter) for x in (a, b) if x.manager)
    async with client_for(a) as on_a, client_for(b) as on_b:
        await on_a.create_session(SID)
        await eventually(lambda: sim.record(SID).qr_codes_sent > 0, 10, "pairing")
        assert await sim.scan(SID)
        await eventually(
            lambda: any(x.manager is not None and SID in x.manager.actors
                        and x.manager.actors[SID].state == State.OPEN for x in (a, b)),
            10, "the session to open on its owner",
        )
        for n, client in enumerate([on_a, on_b, on_a, on_b]):
            assert (await client.send(SID, TO, f"m{n}")).acked
        await rate_limited(on_a, SID, "over-a")
        await rate_limited(on_b, SID, "over-b")
    assert [m.body for m in sim.record(SID).accepted] == ["m0", "m1", "m2", "m3"]
    assert a.manager is not None
    assert await a.manager.store.outbox_depth(SID) == 0
