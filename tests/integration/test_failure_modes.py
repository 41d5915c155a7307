"""Logged out, replaced, pairing and keep-alive: the upstream's faults and what
the broker does about each (docs/lifecycle.md)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import grpc
import pytest
from websockets.asyncio.client import connect

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator, SimulatorConfig
from broker_client import BrokerClient, FailedPrecondition
from broker_client.v1 import broker_pb2 as pb
from tests.conftest import BrokerFactory
from tests.helpers import FAST_POLICY, eventually, paired_session, state_of, wait_state

SID = "962302"


async def test_logged_out_session_is_never_reconnected(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, SID)
    await sim.logout(SID)
    await wait_state(broker, SID, State.LOGGED_OUT)
    attempts = sim.record(SID).connection_attempts
    # Many backoff periods (max 0.1 s) pass: a broker that reconnected would show it.
    await asyncio.sleep(1.0)
    assert sim.record(SID).connection_attempts == attempts
    assert state_of(broker, SID) == State.LOGGED_OUT
    assert broker.manager is not None
    assert await broker.manager.store.load_credentials(SID) is None

    async with BrokerClient(broker.address) as client:
        session = await client.get_session(SID)
        assert session.state == pb.LOGGED_OUT and not session.has_credentials
        with pytest.raises(FailedPrecondition) as err:
            await client.send(SID, "+15550100", "hello")
        assert err.value.reason == "LOGGED_OUT"
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        [health] = await client.health([SID])
    assert "REPAIR_NEEDED" in {r.code for r in health.recommendations}
    assert not health.healthy
    assert sim.record(SID).accepted == []


async def test_replaced_connection_goes_to_conflict_without_a_loop(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    assert broker.manager is not None
    creds = await broker.manager.store.load_credentials(SID)
    attempts = sim.record(SID).connection_attempts
    # Someone outside the broker logs in with the same credentials.
    async with connect(sim.url) as intruder:
        await intruder.send(json.dumps({"type": "hello", "login": SID, "credentials": creds}))
        ready = json.loads(await intruder.recv())
        assert ready["type"] == "ready"
        await wait_state(broker, SID, State.CONFLICT)
        await asyncio.sleep(1.0)  # many backoff periods: a fighting broker would reconnect
        assert sim.record(SID).connection_attempts == attempts + 1  # the intruder's only
        assert state_of(broker, SID) == State.CONFLICT
    assert sim.record(SID).conflicts == 1
    async with BrokerClient(broker.address) as client:
        [health] = await client.health([SID])
    assert "CONFLICTING_CLIENT" in {r.code for r in health.recommendations}


@pytest.fixture
def sim_config() -> SimulatorConfig:
    return SimulatorConfig(idle_timeout_s=0.5, qr_interval_s=0.15, qr_max=20, receipt_delay_s=0.0)


async def test_pairing_qr_rotates_then_515_reconnects_at_once(
    sim: Simulator, broker: BrokerApp
) -> None:
    events: list[pb.StatusEvent] = []
    async with BrokerClient(broker.address) as client:

        async def watch() -> None:
            async for event in client.watch_status([SID]):
                events.append(event)
                if event.state == pb.OPEN:
                    return

        await client.create_session(SID, start=False)
        watcher = asyncio.create_task(watch())
        await eventually(lambda: len(events) >= 1, what="the snapshot")
        await client.restart_session(SID)
        await eventually(lambda: len({e.qr for e in events if e.qr}) >= 2, what="QR rotation")
        qr = await client.get_qr(SID)
        assert qr.qr in {e.qr for e in events}
        assert await sim.scan(SID)
        await asyncio.wait_for(watcher, 10)

    assert events[0].snapshot
    live = events[1:]
    assert [e.sequence for e in live] == sorted({e.sequence for e in live})
    qr_events = [e for e in live if e.state == pb.PAIRING]
    assert len({e.qr for e in qr_events}) >= 2
    after_pairing = live[live.index(qr_events[-1]) + 1:]
    # 515 restart required: straight back to CONNECTING, no RECONNECTING backoff.
    assert [pb.SessionState.Name(e.state) for e in after_pairing] == ["CONNECTING", "OPEN"]
    assert after_pairing[0].code == 515


async def test_keepalive_outlives_idle_timeout(sim: Simulator, make_broker: BrokerFactory) -> None:
    app = await make_broker(replace(FAST_POLICY, keepalive_interval_s=0.1,
                                    keepalive_timeout_s=0.3))
    await paired_session(app, sim, SID)
    attempts = sim.record(SID).connection_attempts
    await asyncio.sleep(1.5)  # three idle timeouts of the simulator
    assert state_of(app, SID) == State.OPEN
    assert sim.record(SID).connection_attempts == attempts
    assert sim.record(SID).pings > 0


async def test_without_keepalive_the_idle_session_is_dropped(
    sim: Simulator, make_broker: BrokerFactory
) -> None:
    app = await make_broker(replace(FAST_POLICY, keepalive_interval_s=None))
    await paired_session(app, sim, SID)
    codes: list[int] = []
    assert app.manager is not None
    with app.manager.subscribe([SID], None) as sub:
        while 408 not in codes:
            event = await asyncio.wait_for(sub.get(), 5)
            assert event is not None
            codes.append(event.code)
    assert sim.record(SID).pings == 0
