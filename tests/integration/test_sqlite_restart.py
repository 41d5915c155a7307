"""The SQLite store across real broker restarts: stopped (SIGTERM) or killed
(SIGKILL) mid-delivery, a broker comes back on the same file, reconnects every
session without pairing and delivers every accepted message exactly once, in
order; a dashboard resumes StatusStream from its last event id across it. One
process per database: a second broker refuses to start, and so does a broker
given a database of a newer schema.

The upstream is a simulator in the test process, so its records (what it
accepted, duplicates, QR codes shown) outlive the brokers.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.simulator import Simulator
from broker.store.base import event_order
from broker.store.sqlite import SCHEMA_VERSION
from broker_client import BrokerClient
from broker_client.v1 import broker_pb2 as pb
from tests.cluster.procs import BrokerProcess
from tests.cluster.test_scale_out import pair_all
from tests.helpers import eventually_async

SESSIONS = [f"r{i:02d}" for i in range(12)]
PER_SESSION = 8
WAIT_S = 30.0
EXTRA = ("--slow-backoff-initial", "0.05", "--slow-backoff-max", "0.3")
"""503 while the upstream is down must not push reconnects minutes away."""
ACK_LATENCY_MS = 1500.0
"""While the first broker delivers: acks (and hellos) this late, so it is stopped
with messages the upstream accepted but whose acks it never heard."""


class Brokers:
    """Broker processes on one SQLite file, started one after another."""

    def __init__(self, sim: Simulator, workdir: Path) -> None:
        self.sim = sim
        self.workdir = workdir
        self.database = workdir / "broker.db"
        self.procs: list[BrokerProcess] = []

    async def start(self, name: str) -> BrokerProcess:
        proc = BrokerProcess(name, f"sqlite://{self.database}", self.sim.url, self.workdir,
                             {}, EXTRA)
        self.procs.append(proc)
        await asyncio.to_thread(proc.start)  # the simulator keeps serving meanwhile
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()


@pytest.fixture
def brokers(sim: Simulator, tmp_path: Path) -> Iterator[Brokers]:
    group = Brokers(sim, tmp_path)
    yield group
    group.close()


async def _states(client: BrokerClient) -> dict[str, int]:
    return {s.session_id: s.state for s in await client.list_sessions()}


async def _pair_all(sim: Simulator, session_ids: list[str]) -> None:
    await pair_all(sim, session_ids, WAIT_S)


async def _snapshot_cursor(client: BrokerClient) -> str:
    """The newest event id of the sessions' snapshot: where a dashboard stands."""
    watch = client.watch_status(SESSIONS)
    ids: list[str] = []
    async with asyncio.timeout(WAIT_S):
        async for event in watch:
            assert event.snapshot and event.event_id
            ids.append(event.event_id)
            if len(ids) == len(SESSIONS):
                break
    await watch.aclose()
    return max(ids, key=event_order)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_a_restart_mid_delivery_loses_nothing_and_needs_no_pairing(
    sim: Simulator, brokers: Brokers, sig: signal.Signals,
) -> None:
    first = await brokers.start("first")
    async with BrokerClient(first.address, timeout=WAIT_S) as client:
        for sid in SESSIONS:
            await client.create_session(sid)
        await _pair_all(sim, SESSIONS)

        async def all_open() -> bool:
            return all(s == pb.OPEN for s in (await _states(client)).values())

        await eventually_async(all_open, WAIT_S, "every session to open")
        cursor = await _snapshot_cursor(client)
        qr_codes = {sid: sim.record(sid).qr_codes_sent for sid in SESSIONS}

        # The upstream goes down; messages queue up meanwhile.
        sim.set_unavailable(503, count=1_000_000)
        for sid in SESSIONS:
            await sim.drop(sid)

        async def none_open() -> bool:
            return not any(s == pb.OPEN for s in (await _states(client)).values())

        await eventually_async(none_open, WAIT_S, "every session to notice the drop")
        expected: dict[str, list[str]] = {sid: [] for sid in SESSIONS}
        for n in range(PER_SESSION):
            for sid in SESSIONS:
                result = await client.send(sid, "+15550100", f"{sid}-{n}",
                                           idempotency_key=f"{sid}-{n}", wait=False)
                assert not result.acked
                expected[sid].append(result.message_id)
        assert not any(sim.record(sid).accepted for sid in SESSIONS)

        # The upstream is back, slow to answer: stop the broker as soon as it delivers.
        sim.set_faults(latency_ms=ACK_LATENCY_MS)
        sim.set_unavailable(503, count=0)
        await sim.wait_for(lambda: any(sim.record(s).accepted for s in SESSIONS), WAIT_S)
    first.signal(sig)
    code = await asyncio.to_thread(first.wait, WAIT_S)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), first.log()
    sim.set_faults()

    second = await brokers.start("second")
    async with BrokerClient(second.address, timeout=WAIT_S) as client:
        async def delivered() -> bool:
            sessions = await client.list_sessions()
            return all(s.state == pb.OPEN and s.outbox_depth == 0 for s in sessions)

        await eventually_async(delivered, WAIT_S, "every session to deliver its outbox")
        for sid in SESSIONS:
            record = sim.record(sid)
            # exactly once, in the order each Send was accepted
            assert record.accepted_ids() == expected[sid], sid
            assert record.qr_codes_sent == qr_codes[sid], f"{sid} had to pair again"
        # what the first broker sent without hearing the ack went again, and the
        # upstream de-duplicated it: the restart really came mid-delivery
        assert sum(sim.record(sid).duplicates for sid in SESSIONS) > 0
        # a retried Send learns its message's fate from the store
        again = await client.send(SESSIONS[0], "+15550100", "x", idempotency_key="r00-0")
        assert again.duplicate and again.acked and again.message_id == expected["r00"][0]
        # and the sessions take new messages, as paired sessions do
        for sid in SESSIONS:
            fresh = await client.send(sid, "+15550100", "after", idempotency_key=f"{sid}-new")
            assert fresh.acked and not fresh.duplicate
            assert sim.record(sid).accepted_ids() == [*expected[sid], fresh.message_id]

        # StatusStream resumes from the dashboard's last event id across the restart:
        # first the first broker's transitions after it (from the file), then the
        # second broker's, with each session's sequence numbers unbroken.
        sequences: dict[str, list[int]] = {sid: [] for sid in SESSIONS}
        states: dict[str, list[int]] = {sid: [] for sid in SESSIONS}
        last = cursor
        watch = client.watch_status(SESSIONS, resume_after=cursor)
        async with asyncio.timeout(WAIT_S):
            async for event in watch:
                assert not event.snapshot and not event.resync
                assert event_order(event.event_id) > event_order(last)
                last = event.event_id
                sequences[event.session_id].append(event.sequence)
                states[event.session_id].append(event.state)
                if all(s and s[-1] == pb.OPEN and pb.RECONNECTING in s for s in states.values()):
                    break
        await watch.aclose()
    for sid in SESSIONS:
        run = sequences[sid]
        assert run == list(range(run[0], run[0] + len(run))), (sid, run)
        assert pb.PAIRING not in states[sid], sid
    # the credentials behind those reconnects are sealed in the file
    raw = b"".join(p.read_bytes() for p in brokers.workdir.glob("broker.db*") if p.is_file())
    tokens = list(sim._tokens.values())
    assert len(tokens) == len(SESSIONS)
    assert not [t for t in tokens if t.encode() in raw]


def _serve(database: Path, upstream_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "serve", "--listen", "127.0.0.1:0",
         "--store", f"sqlite://{database}", "--upstream-url", upstream_url],
        capture_output=True, text=True, timeout=60,
    )


async def test_a_second_broker_on_the_same_database_refuses_to_start(
    sim: Simulator, brokers: Brokers,
) -> None:
    first = await brokers.start("first")
    refused = await asyncio.to_thread(_serve, brokers.database, sim.url)
    assert refused.returncode != 0
    assert f"the SQLite database {brokers.database} is in use by another broker process " \
           f"(pid {first.proc.pid if first.proc else '?'})" in refused.stderr
    assert "Redis" in refused.stderr and "broker listening" not in refused.stderr
    assert first.alive
    async with BrokerClient(first.address) as client:  # the first one is unharmed
        await client.create_session("still-served")


async def test_a_database_of_a_newer_schema_is_refused(sim: Simulator, tmp_path: Path) -> None:
    database = tmp_path / "broker.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE future (x INTEGER)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    refused = await asyncio.to_thread(_serve, database, sim.url)
    assert refused.returncode != 0
    assert f"has schema version {SCHEMA_VERSION + 1}, newer than this broker's " \
           f"{SCHEMA_VERSION}" in refused.stderr
    assert "broker listening" not in refused.stderr
    with sqlite3.connect(database) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
