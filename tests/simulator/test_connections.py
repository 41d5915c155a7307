"""One live connection per login, logout, bans, unavailability, idle timeout, drops."""

from __future__ import annotations

import asyncio

from broker.simulator import Simulator, SimulatorConfig
from broker.upstream.protocol import Error, Ping, Pong, encode

from .helpers import (
    dial,
    next_frame,
    open_session,
    reconnect,
    say_hello,
    send_raw,
    until_closed,
)


async def test_second_connection_replaces_the_first(sim: Simulator) -> None:
    creds = sim.issue_credentials("alice")
    first = await reconnect(sim, "alice", creds)
    second = await reconnect(sim, "alice", creds)

    closed = await until_closed(first)
    assert closed.code == 4440
    record = sim.record("alice")
    assert record.conflicts == 1
    # Two were live at once until the upstream closed the first: that is an overlap,
    # and counting it before the close is what lets a test see it at all.
    assert record.max_concurrent == 2
    [overlap] = record.overlaps
    assert (overlap.older_connection, overlap.newer_connection) == ("c-1", "c-2")
    await sim.wait_for(lambda: overlap.seconds is not None)  # once c-1's socket is gone
    assert sim.live_connections("alice") == 1
    await second.close()


async def test_logout_revokes_credentials_for_good(sim: Simulator) -> None:
    creds = sim.issue_credentials("bob")
    ws = await reconnect(sim, "bob", creds)
    await sim.logout("bob")
    assert (await until_closed(ws)).code == 4401

    again = await say_hello(sim, "bob", creds)
    assert (await until_closed(again)).code == 4401
    assert sim.record("bob").logouts == 1


async def test_logout_frame_from_the_client(sim: Simulator) -> None:
    creds = sim.issue_credentials("bob")
    ws = await reconnect(sim, "bob", creds)
    await ws.send('{"type": "logout"}')
    assert (await until_closed(ws)).code == 4401
    assert (await until_closed(await say_hello(sim, "bob", creds))).code == 4401


async def test_unknown_and_corrupt_credentials(sim: Simulator) -> None:
    unknown = await say_hello(sim, "carol", {"token": "nope"})
    assert (await until_closed(unknown)).code == 4401
    corrupt = await say_hello(sim, "carol", {"token": 17})
    assert (await until_closed(corrupt)).code == 4500
    not_an_object = await dial(sim)
    await send_raw(not_an_object, {"type": "hello", "login": "carol", "credentials": "x"})
    assert (await until_closed(not_an_object)).code == 4500


async def test_ban_closes_and_refuses_until_unban(sim: Simulator) -> None:
    creds = sim.issue_credentials("dave")
    ws = await reconnect(sim, "dave", creds)
    await sim.ban("dave")
    assert (await until_closed(ws)).code == 4403
    assert (await until_closed(await say_hello(sim, "dave", creds))).code == 4403

    await sim.unban("dave")
    ws = await reconnect(sim, "dave", creds)
    await ws.close()


async def test_unavailable_sends_error_with_retry_after(sim: Simulator) -> None:
    creds = sim.issue_credentials("erin")
    sim.set_unavailable(503, count=2, retry_after_ms=1500)
    for _ in range(2):
        closed = await until_closed(await say_hello(sim, "erin", creds))
        assert closed.code == 4503
        assert closed.frames == [Error(code=503, reason="service unavailable", retry_after_ms=1500)]
    ws = await reconnect(sim, "erin", creds)  # the count is used up
    await ws.close()

    sim.set_unavailable(429)
    closed = await until_closed(await say_hello(sim, "erin", creds))
    assert closed.code == 4429
    assert closed.frames == [Error(code=429, reason="rate limited", retry_after_ms=None)]


async def test_idle_connection_is_closed_408(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "frank")
    closed = await until_closed(ws)
    assert closed.code == 4408


async def test_pinging_keeps_the_connection_open() -> None:
    async with Simulator(SimulatorConfig(idle_timeout_s=0.6)) as sim:
        ws, _ = await open_session(sim, "frank")
        # Ten pings 0.1 s apart span almost twice the idle timeout.
        for ping_id in range(10):
            await ws.send(encode(Ping(id=ping_id)))
            assert await next_frame(ws) == Pong(id=ping_id)
            await asyncio.sleep(0.1)
        assert sim.live_connections("frank") == 1
        assert sim.record("frank").pings == 10
        await ws.close()


async def test_abrupt_drop_sends_no_close_frame(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "gina")
    assert await sim.drop("gina")
    closed = await until_closed(ws)
    assert closed.code is None
    assert sim.record("gina").drops == 1
    assert not await sim.drop("gina")  # nothing live any more


async def test_drop_with_a_code_sends_it(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "gina")
    assert await sim.drop("gina", 503)
    assert (await until_closed(ws)).code == 4503


async def test_scheduled_drops_hit_every_live_connection(sim: Simulator) -> None:
    a, _ = await open_session(sim, "hank")
    b, _ = await open_session(sim, "ivy")
    sim.set_faults(drop_min_s=0.02, drop_max_s=0.05)
    assert (await until_closed(a)).code is None
    assert (await until_closed(b)).code is None
    # and it keeps happening to new connections (possibly before ready arrives)
    c = await say_hello(sim, "hank", sim.issue_credentials("hank"))
    assert (await until_closed(c)).code is None
    assert sim.record("hank").drops == 2
    sim.set_faults()
