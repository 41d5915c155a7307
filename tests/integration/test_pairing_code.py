"""Pairing by phone number through a real broker and the simulator: the code the
broker hands out is the one the simulator accepts, and the session opens (with
the 515 restart, as after a QR scan); bad input and wrong states are typed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from click.testing import CliRunner

from broker.app import BrokerApp
from broker.cli import main
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient, FailedPrecondition, InvalidArgument, SyncBrokerClient
from tests.helpers import paired_session, wait_state

PHONE = "+4915123456789"


async def test_a_pairing_code_pairs_the_session(sim: Simulator, broker: BrokerApp) -> None:
    sessions = [f"pc-{n}" for n in range(5)]
    async with BrokerClient(broker.address) as client:
        for sid in sessions:
            await client.create_session(sid)
        for sid in sessions:
            await wait_state(broker, sid, State.PAIRING)
        codes = {sid: await client.request_pairing_code(sid, PHONE) for sid in sessions}
        assert all(len(code) == 8 for code in codes.values())
        assert len(set(codes.values())) == len(sessions)
        for sid, code in codes.items():
            assert (await sim.enter_code(code)) == sid
        for sid in sessions:
            await wait_state(broker, sid, State.OPEN)
            session = await client.get_session(sid)
            assert session.has_credentials
        # A code pairs once: entering it again does nothing.
        assert await sim.enter_code(codes[sessions[0]]) is None
    for sid in sessions:
        assert sim.record(sid).pairing_codes == [PHONE]
        assert sim.record(sid).connection_attempts == 2  # pairing, then the 515 restart


async def test_bad_numbers_and_sessions_that_are_not_pairing_are_refused(
    sim: Simulator, broker: BrokerApp,
) -> None:
    await paired_session(broker, sim, "open-1")
    async with BrokerClient(broker.address) as client:
        await client.create_session("pairing-1")
        await wait_state(broker, "pairing-1", State.PAIRING)
        for bad in ["4915123456789", "+0151234567", "+49", "+49 151 abc 4567", ""]:
            with pytest.raises(InvalidArgument) as invalid:
                await client.request_pairing_code("pairing-1", bad)
            assert invalid.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "E.164" in invalid.value.message or "required" in invalid.value.message
        with pytest.raises(FailedPrecondition) as open_session:
            await client.request_pairing_code("open-1", PHONE)
        assert open_session.value.reason == "NOT_PAIRING"
        assert "OPEN, not pairing" in open_session.value.message
        await client.create_session("stopped-1", start=False)
        with pytest.raises(FailedPrecondition) as stopped:
            await client.request_pairing_code("stopped-1", PHONE)
        assert stopped.value.reason == "NOT_PAIRING"
    assert sim.record("pairing-1").pairing_codes == []
    assert sim.record("open-1").pairing_codes == []


async def test_the_cli_and_the_sync_client_ask_for_codes(
    sim: Simulator, broker: BrokerApp,
) -> None:
    async with BrokerClient(broker.address) as client:
        await client.create_session("cli-1")
        await client.create_session("sync-1")
    await wait_state(broker, "cli-1", State.PAIRING)
    await wait_state(broker, "sync-1", State.PAIRING)

    def use_cli() -> str:
        result = CliRunner().invoke(main, ["pair", "cli-1", "--phone", PHONE,
                                           "--target", broker.address])
        assert result.exit_code == 0, result.output
        return result.output.split(": ", 1)[1].split()[0]

    printed = await asyncio.to_thread(use_cli)
    assert len(printed) == 9 and printed[4] == "-"
    assert await sim.enter_code(printed) == "cli-1"

    def use_sync() -> str:
        with SyncBrokerClient(broker.address) as sync:
            return sync.request_pairing_code("sync-1", PHONE)

    assert await sim.enter_code(await asyncio.to_thread(use_sync)) == "sync-1"
    await wait_state(broker, "cli-1", State.OPEN)
    await wait_state(broker, "sync-1", State.OPEN)

    def bad_cli() -> str:
        result = CliRunner().invoke(main, ["pair", "cli-1", "--phone", PHONE,
                                           "--target", broker.address])
        assert result.exit_code != 0
        return result.output

    assert "FAILED_PRECONDITION NOT_PAIRING" in await asyncio.to_thread(bad_cli)


async def test_health_names_the_engine(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, "h-1")
    async with BrokerClient(broker.address) as client:
        [health] = await client.health(["h-1"])
    assert health.engine == "ws"  # the test broker is pointed at a simulator by URL
