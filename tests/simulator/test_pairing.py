"""Pairing: rotating QR codes, the 4408 limit, scan -> paired -> 4515 -> ready."""

from __future__ import annotations

from broker.simulator import Simulator, SimulatorConfig
from broker.upstream.protocol import Paired, Qr, Ready

from .helpers import next_frame, reconnect, say_hello, until_closed


async def test_qr_codes_rotate_then_pairing_times_out(sim: Simulator) -> None:
    ws = await say_hello(sim, "alice", None)
    closed = await until_closed(ws)

    assert closed.code == 4408
    assert closed.reason == "pairing timed out"
    qrs = [f for f in closed.frames if isinstance(f, Qr)]
    assert [q.index for q in qrs] == [1, 2, 3]
    assert len({q.code for q in qrs}) == 3
    assert all(q.code.startswith("2@") and q.expires_in_ms == 50 for q in qrs)
    assert sim.record("alice").qr_codes_sent == 3
    assert sim.record("alice").connection_attempts == 1


async def test_scan_pairs_requires_restart_then_credentials_work() -> None:
    async with Simulator(SimulatorConfig(qr_interval_s=5.0)) as sim:
        assert not await sim.scan("bob")  # nobody is pairing yet
        ws = await say_hello(sim, "bob", None)
        first = await next_frame(ws)
        assert isinstance(first, Qr) and first.index == 1

        assert await sim.scan("bob")
        closed = await until_closed(ws)
        assert closed.code == 4515
        paired = closed.frames[-1]
        assert isinstance(paired, Paired)
        assert isinstance(paired.credentials["token"], str)

        ws2 = await reconnect(sim, "bob", paired.credentials)
        assert sim.live_connections("bob") == 1
        assert sim.record("bob").connection_attempts == 2
        await ws2.close()


async def test_scan_on_a_finished_pairing_does_nothing(sim: Simulator) -> None:
    ws = await say_hello(sim, "carol", None)
    assert (await until_closed(ws)).code == 4408
    assert not await sim.scan("carol")


async def test_ready_reports_login_and_connection_id(sim: Simulator) -> None:
    ws = await say_hello(sim, "dave", sim.issue_credentials("dave"))
    ready = await next_frame(ws)
    assert isinstance(ready, Ready)
    assert ready.login == "dave" and ready.connection_id.startswith("c-")
    await ws.close()
