"""The HTTP control endpoint, through SimulatorControl and the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import pytest
from click.testing import CliRunner

from broker.simulator import Simulator, SimulatorConfig
from broker.simulator.cli import sim as sim_cli
from broker.simulator.control import SimulatorControl, SimulatorControlError
from broker.upstream.protocol import Ack, Message, Paired, Qr, Send, encode

from .helpers import next_frame, open_session, reconnect, say_hello, until_closed


async def test_control_commands_drive_the_simulator() -> None:
    async with Simulator(SimulatorConfig(qr_interval_s=5.0, receipt_delay_s=0)) as sim:
        control = SimulatorControl(sim.control_url)

        pairing = await say_hello(sim, "alice", None)
        assert isinstance(await next_frame(pairing), Qr)
        assert await asyncio.to_thread(control.scan, "alice") == {"scanned": True}
        closed = await until_closed(pairing)
        assert closed.code == 4515
        paired = closed.frames[-1]
        assert isinstance(paired, Paired)

        ws = await reconnect(sim, "alice", paired.credentials)
        await ws.send(encode(Send(id="m-1", to="x", body="y")))
        assert await next_frame(ws) == Ack(id="m-1")
        inbound = await asyncio.to_thread(control.inbound, "alice", "1555", "hey")
        message = await next_frame(ws)
        assert isinstance(message, Message) and message.id == inbound["id"]

        record = await asyncio.to_thread(control.record, "alice")
        assert [m["id"] for m in record["accepted"]] == ["m-1"]
        assert record["connection_attempts"] == 2
        state = await asyncio.to_thread(control.state)
        assert state["logins"]["alice"]["live_connections"] == 1

        assert await asyncio.to_thread(control.drop, "alice", 428) == {"dropped": True}
        assert (await until_closed(ws)).code is None

        await asyncio.to_thread(control.ban, "alice")
        assert (await until_closed(await say_hello(sim, "alice", paired.credentials))).code == 4403
        await asyncio.to_thread(control.unban, "alice")
        await asyncio.to_thread(control.unavailable, 429, 1, 250)
        assert (await until_closed(await say_hello(sim, "alice", paired.credentials))).code == 4429
        ws = await reconnect(sim, "alice", paired.credentials)
        await asyncio.to_thread(control.logout, "alice")
        assert (await until_closed(ws)).code == 4401

        answer = await asyncio.to_thread(control.faults, latency_ms=5, lose_acks=0.5)
        assert answer["faults"]["lose_acks"] == 0.5
        await asyncio.to_thread(control.reset)
        assert sim.record("alice").connection_attempts == 0


async def test_control_rejects_unknown_commands_and_bad_parameters(sim: Simulator) -> None:
    control = SimulatorControl(sim.control_url)
    cases = [
        (lambda: control.command("explode"), 404, "unknown command"),
        (lambda: control.command("scan"), 400, "missing parameter 'login'"),
        (lambda: control.drop("alice", 5000), 400, "code"),
        (lambda: control.command("drop", login="a", code="x"), 400, "integer"),
        (lambda: control.unavailable(500), 400, "503 or 429"),
        (lambda: control.faults(lose_acks=2), 400, "lose_acks"),
        (lambda: control.faults(drop_min_s=2, drop_max_s=1), 400, "drop_min_s"),
    ]
    for call, status, text in cases:
        with pytest.raises(SimulatorControlError) as caught:
            await asyncio.to_thread(call)
        assert caught.value.status == status
        assert text in str(caught.value)


async def test_plain_http_to_other_paths_is_404(sim: Simulator) -> None:
    control = SimulatorControl(sim.control_url + "/elsewhere")
    with pytest.raises(SimulatorControlError) as caught:
        await asyncio.to_thread(control.state)
    assert caught.value.status == 404


async def test_control_reports_an_unreachable_simulator() -> None:
    control = SimulatorControl("http://127.0.0.1:9", timeout=2.0)
    with pytest.raises(SimulatorControlError) as caught:
        await asyncio.to_thread(control.state)
    assert caught.value.status is None


async def test_cli_talks_to_the_control_endpoint(sim: Simulator) -> None:
    ws, _ = await open_session(sim, "bob")
    runner = CliRunner()
    result = await asyncio.to_thread(
        runner.invoke, sim_cli, ["inbound", "bob", "hello", "--url", sim.control_url]
    )
    assert result.exit_code == 0, result.output
    message_id = json.loads(result.output)["id"]
    frame = await next_frame(ws)
    assert isinstance(frame, Message) and frame.id == message_id

    result = await asyncio.to_thread(
        runner.invoke, sim_cli, ["record", "bob"], env={"BROKER_SIM_URL": sim.control_url}
    )
    assert json.loads(result.output)["connection_attempts"] == 1

    result = await asyncio.to_thread(
        runner.invoke, sim_cli, ["drop", "bob", "--code", "5000", "--url", sim.control_url]
    )
    assert result.exit_code == 1
    assert "code must be between" in result.output
    await ws.close()


async def test_python_dash_m_serves_until_interrupted() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker.simulator", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("upstream: ws://127.0.0.1:")
        url = line.split()[-1].removesuffix("/v1/connect").replace("ws://", "http://")
        state = await asyncio.to_thread(SimulatorControl(url).state)
        assert state["logins"] == {}
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            await process.wait()
    assert process.returncode == 0
