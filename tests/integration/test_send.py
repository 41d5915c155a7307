"""Send semantics: idempotency keys, waiting out a reconnect, the deadline
answer, and per-session FIFO."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient, NeedsPairing, NotDeliveredYet
from tests.helpers import paired_session, wait_state

SID = "962302"


async def test_same_key_returns_the_first_result_and_sends_once(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    async with BrokerClient(broker.address) as client:
        first = await client.send(SID, "+15550100", "hello", idempotency_key="order-1")
        again = await client.send(SID, "+15550100", "hello", idempotency_key="order-1")
    assert first.acked and not first.duplicate
    assert again.duplicate and again.message_id == first.message_id
    assert [m.id for m in sim.record(SID).accepted] == [first.message_id]


async def test_messages_wait_out_a_reconnect(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, SID)
    sim.set_unavailable(503, count=3, retry_after_ms=100)  # the next reconnects are refused
    assert await sim.drop(SID)
    await wait_state(broker, SID, State.RECONNECTING)
    async with BrokerClient(broker.address, timeout=30) as client:
        results = await asyncio.gather(
            *(client.send(SID, "+15550100", f"m{n}", idempotency_key=f"k{n}") for n in range(5))
        )
    assert all(r.acked for r in results)
    accepted = [m.id for m in sim.record(SID).accepted]
    assert accepted == [r.message_id for r in sorted(results, key=lambda r: r.sequence)]


async def test_deadline_while_reconnecting_is_unavailable_and_retry_is_safe(
    sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    sim.set_unavailable(503, count=1_000_000, retry_after_ms=50)
    assert await sim.drop(SID)
    await wait_state(broker, SID, State.RECONNECTING)
    async with BrokerClient(broker.address, timeout=0.5, retry_attempts=1) as client:
        with pytest.raises(NotDeliveredYet) as err:
            await client.send(SID, "+15550100", "late", idempotency_key="late-1")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert err.value.retry_after is not None
        assert sim.record(SID).accepted == []
        sim.set_unavailable(503, count=0)
        await wait_state(broker, SID, State.OPEN)
    async with BrokerClient(broker.address, timeout=10) as client:
        retried = await client.send(SID, "+15550100", "late", idempotency_key="late-1")
    assert retried.acked and retried.duplicate
    assert [m.body for m in sim.record(SID).accepted] == ["late"]


async def test_session_waiting_for_pairing_refuses_sends(
    sim: Simulator, broker: BrokerApp
) -> None:
    assert broker.manager is not None
    await broker.manager.create(SID)
    await wait_state(broker, SID, State.PAIRING)
    async with BrokerClient(broker.address) as client:
        with pytest.raises(NeedsPairing):
            await client.send(SID, "+15550100", "too early")
    assert await broker.manager.store.outbox_depth(SID) == 0
