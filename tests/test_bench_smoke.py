"""The benchmark harness still runs end to end (a few requests per scenario),
and the behaviour the profile-driven fixes had to keep.

The smoke run checks that every scenario reports numbers and that both outputs
are written; nothing here asserts a timing (benchmarks print numbers, tests
assert behaviour).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker.lifecycle.machine import SessionMachine
from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import State
from broker.runtime.bus import StatusBus, session_filter
from broker.simulator import Simulator, SimulatorConfig
from broker.store.base import StatusEvent
from broker.upstream.websocket import WebsocketProvider
from tests.redis_server import find_redis_server

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("send", "sessions", "fairness", "fanout", "idle", "reconnect", "flapping",
             "failover")
SEND_PATHS = ("grpc_echo", "upstream_ws", "relay", "aiohttp", "express", "memory", "sqlite",
              "redis", "memory_stream", "memory_batch", "redis_stream", "client", "client_unary")


@pytest.mark.timeout(150)
def test_smoke_run_reports_every_scenario(tmp_path: Path) -> None:
    if find_redis_server() is None:
        pytest.skip("redis-server not found: the Send-on-Redis and failover scenarios need it")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench" / "run.py"), "--smoke",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=140, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "benchmarks.json").read_text())
    run = doc["runs"]["latest"]
    assert run["mode"] == "smoke"
    results = run["results"]
    for name in SCENARIOS:
        assert name in results, name
        assert "error" not in results[name], (name, results[name], done.stdout[-3000:])
    for target in SEND_PATHS:
        point = next(iter(results["send"][target].values()))
        assert point["n"] > 0 and not point["errors"], (target, point)
        # each path's CPU per request, of every process it runs on
        cpu = point["cpu_us_per_request"]
        assert {"sim", "load"} <= set(cpu), (target, cpu)
        assert ("server" in cpu) == (target != "upstream_ws"), (target, cpu)
    for n in ("3", "6"):  # the smoke preset: 3 and 6 sessions
        point = results["sessions"][n]
        for path in ("one_session", "many_sessions", "one_session_stream",
                     "many_sessions_stream"):
            assert point[path]["n"] > 0 and not point[path]["errors"], (path, point)
        assert point["aggregate_vs_one"] > 0
    fair = results["fairness"]
    assert fair["light_alone"]["n"] > 0 and fair["light_under_flood"]["n"] > 0, fair
    assert fair["flood"]["n"] > 0 and fair["p99_ratio"] > 0, fair
    commits = results["send"]["sqlite_group_commit"]
    assert 0 < commits["transactions"] <= commits["writes"], commits
    assert commits["messages"] > 0, commits
    assert results["flapping"]["duplicate_deliveries"] == 0
    assert results["flapping"]["delivery_rate"] == 1.0
    for side in ("broker", "ideal"):  # what a user feels, next to the ideal reference
        flap = results["flapping"][side]
        assert {"availability", "reconnect_gap", "attempts_per_minute", "ack_latency"} <= set(flap)
        assert flap["ack_latency"]["n"] > 0, (side, flap)
    assert results["flapping"]["broker"]["within_attempt_bound"] is True
    assert {t["target"] for t in run["targets"]}
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "## Targets" in markdown and "architecture floor" in markdown
    assert "HTTP relay, aiohttp" in markdown and "Express + ws" in markdown
    assert "## Many sessions" in markdown and "## Fairness" in markdown
    assert "CPU per request, by process" in markdown
    assert any(t["target"].startswith("SendStream memory") and t["met"] is not None
               for t in run["targets"])


def test_the_run_by_run_table_lines_up_runs_that_measured_different_scenarios() -> None:
    sys.path.insert(0, str(ROOT))
    from scripts.bench import report

    full = {"send": {t: {"64": {"throughput_rps": 100.0, "p99_ms": 10.0}}
                     for t in ("relay", "memory", "redis")},
            "idle": {"sessions": 10000, "rss_per_session_kb": 20.0}}
    only_fanout = {"fanout": {"subscribers": 1000, "per_delivery": {"p99_ms": 50.0}}}
    doc = {"latest": "a", "runs": {
        name: {"mode": "full", "command": "x", "commands": ["x"], "date": "d", "cores": 2,
               "cpu": "c", "python": "3", "results": results,
               "targets": report.targets(results)}
        for name, results in (("a", full), ("b", only_fanout))}}
    table = report.render(doc, "a").split("| target | `a` | `b` |", 1)[1]
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:12]}
    assert "1.00x (met)" in rows["Send memory c=64 throughput vs relay floor"]
    assert "not measured" in rows["Send memory c=64 throughput vs relay floor"]
    assert "50.0 ms" in rows["StreamStatus fan-out to 1000 subscribers p99"]
    assert "20.0 KB (met)" in rows["10000 idle sessions: RSS per session"]


# -- behaviour the profile-driven fixes must keep (docs/benchmarks.md) ----------------


def _event(sequence: int) -> StatusEvent:
    return StatusEvent(session_id="s1", tenant="t", sequence=sequence, state=State.OPEN,
                       previous=State.CONNECTING, at=float(sequence))


async def test_subscription_delivers_in_order_then_none_after_overflow() -> None:
    bus = StatusBus(buffer=2)
    with bus.subscribe(session_filter([], None)) as sub:
        reader = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        bus.publish(_event(1))  # wakes the waiting reader
        first = await asyncio.wait_for(reader, 1)
        assert first is not None and first.sequence == 1
        bus.publish(_event(2))
        bus.publish(_event(3))
        bus.publish(_event(4))  # the buffer of 2 is full: cut off
        assert await sub.get() is None
        assert await sub.get() is None


async def test_subscription_overflow_wakes_a_waiting_reader_and_cancel_is_clean() -> None:
    bus = StatusBus(buffer=1)
    with bus.subscribe(session_filter(["other"], None)) as sub:
        waiting = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        bus.publish(_event(1))  # filtered out: the reader keeps waiting
        await asyncio.sleep(0.01)
        assert not waiting.done()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    with bus.subscribe(session_filter([], None)) as sub:
        sub.queue.append(_event(1))  # full
        waiting = asyncio.ensure_future(sub.get())
        assert (await asyncio.wait_for(waiting, 1)) is not None
        waiting = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        bus.publish(_event(2))
        bus.publish(_event(3))  # overflow while the reader waits
        got = await asyncio.wait_for(waiting, 1)
        assert got is not None and got.sequence == 2
        assert await sub.get() is None


async def test_memory_outbox_forgets_the_oldest_keys_in_order() -> None:
    """The kept keys are trimmed from the front of an OrderedDict (a plain dict made
    every trim scan all the slots deleted before it)."""
    from collections import OrderedDict

    from broker.store.base import NewMessage, OutboxBatch
    from broker.store.memory import MemoryStore

    store = MemoryStore(results_kept=3)
    for n in range(6):
        out = await store.apply_outbox("s1", OutboxBatch(messages=[NewMessage("+1", "b", f"k{n}")]),
                                       max_depth=100, at=1.0)
        mid = out.accepted[0].message.message_id  # type: ignore[union-attr]
        await store.apply_outbox("s1", OutboxBatch(acks=[mid]), max_depth=100, at=2.0)
    box = store._outboxes["s1"]
    assert isinstance(box.known, OrderedDict)
    assert [k[2] for k in box.known.values()] == ["k3", "k4", "k5"]
    assert await store.find_by_key("s1", "k0") is None
    assert await store.find_by_key("s1", "k5") is not None


def test_machines_share_one_jitter_source_unless_given_one() -> None:
    a, b = SessionMachine(), SessionMachine()
    assert a._rng is b._rng
    own = random.Random(1)
    assert SessionMachine(rng=own)._rng is own


async def test_upstream_connection_is_not_compressed() -> None:
    async with Simulator(SimulatorConfig()) as sim:
        link = await WebsocketProvider(sim.url).connect("nodeflate", None)
        try:
            assert link._ws.protocol.extensions == []
        finally:
            await link.close(DisconnectCode.CONNECTION_CLOSED, "done")


@pytest.mark.timeout(120)
async def test_scale_scenario_runs_on_a_redis_cluster(tmp_path: Path) -> None:
    """The scale scenario's cluster path (per-primary counts, failover) on a few sessions."""
    if find_redis_server() is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for the cluster scale scenario")
    from scripts.bench.scale import one_size

    result = await one_size(12, brokers=2, engine="null", window_s=0.5, ttl_s=1.5,
                            workdir=tmp_path, redis="cluster")
    assert result["redis"] == "cluster" and len(result["per_primary"]) == 3
    assert sum(result["owners"].values()) == 12
    assert result["failover"]["sessions_moved"] > 0
