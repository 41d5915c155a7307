"""Media on Redis (issue 15): a queued image is durable like text. A broker restart
with it still queued delivers the same bytes after, and once acked its bytes stay
under the session's hash tag only for the sent-message retention."""

from __future__ import annotations

import os

import redis.asyncio as aioredis

from broker import content as contents
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.cluster.test_redis_broker import redis_broker  # noqa: F401  (fixture)
from tests.conftest import BrokerFactory
from tests.helpers import eventually, eventually_async, paired_session, wait_state
from tests.redis_server import RedisServer

SIDS = ["img-1", "img-2", "img-3"]


async def test_a_queued_image_survives_a_broker_restart_byte_for_byte(
    sim: Simulator, redis_server: RedisServer, redis_broker: BrokerFactory,  # noqa: F811
) -> None:
    first = await redis_broker(sent_retention_s=2.0)
    for sid in SIDS:
        await paired_session(first, sim, sid)
    images = {sid: os.urandom(3 * 1024 * 1024) for sid in SIDS}
    # The upstream refuses reconnects for now: what is accepted waits in Redis.
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    for sid in SIDS:
        await sim.drop(sid)
        await wait_state(first, sid, State.RECONNECTING)
    async with BrokerClient(first.address, timeout=10, retry_attempts=1) as client:
        queued = {sid: await client.send_image(sid, "+15550100", images[sid], caption=sid,
                                               idempotency_key="img", wait=False)
                  for sid in SIDS}
    assert all(not q.acked for q in queued.values())
    await first.stop()
    assert all(sim.record(sid).accepted == [] for sid in SIDS)

    sim.set_unavailable(503, count=0)
    second = await redis_broker(sent_retention_s=2.0)
    for sid in SIDS:
        await wait_state(second, sid, State.OPEN, timeout=30)
    await eventually(lambda: all(sim.record(sid).accepted for sid in SIDS), 30,
                     "the queued images")
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for sid in SIDS:
            record = sim.record(sid)
            assert record.accepted_ids() == [queued[sid].message_id]
            assert sim.media(sid, queued[sid].message_id) == images[sid]
            assert record.accepted[0].content is not None
            assert record.accepted[0].content["media"]["caption"] == sid
        # Acked: the bytes are kept under the session's hash tag for the retention only.
        sid, mid = SIDS[0], queued[SIDS[0]].message_id
        key = f"broker:{{s:{sid}}}:result:{mid}:content"


        async def kept_for_the_retention() -> bool:
            stored = await raw.get(key)
            if not isinstance(stored, bytes):
                return False
            medium = contents.decode(stored).media
            return medium is not None and medium.data == images[sid] and \
                0 < await raw.pttl(key) <= 2000

        await eventually_async(kept_for_the_retention, 10, "the acked image's retention")
        assert second.manager is not None
        sent = await second.manager.store.sent_message(sid, mid)
        assert sent is not None and sent.content is not None
        assert await raw.xlen(f"broker:{{s:{sid}}}:outbox") == 0
    finally:
        await raw.aclose()
