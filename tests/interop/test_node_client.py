"""The Node.js client (clients/node) against a live broker on loopback.

Runs the example worker as a person would (`node examples/worker.js ...`) and
checks what reached the simulator, plus the package's own `node --test` unit
tests. Skipped when `node` is not installed; `npm ci` runs once when
node_modules is missing (scripts/test.sh normally does it first).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker.app import BrokerApp
from broker.simulator import Simulator
from tests.helpers import paired_session

NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
SID = "962302"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture(scope="module")
def node_client() -> Path:
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if NPM is None:
            pytest.skip("npm is not installed and clients/node/node_modules is missing")
        subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                       timeout=300, capture_output=True)
    return NODE_DIR


async def run_worker(*args: str, script: str = "examples/worker.js"
                     ) -> tuple[int, list[dict[str, Any]]]:
    """Run an example without blocking the loop that serves the broker."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE, script, *args, cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert proc.returncode is not None
    assert proc.returncode == 0 or lines, err.decode()
    return proc.returncode, lines


async def test_worker_sends_once_and_prints_status(
    node_client: Path, sim: Simulator, broker: BrokerApp
) -> None:
    await paired_session(broker, sim, SID)
    args = ("--target", broker.address, "--session", SID, "--to", "+15550100",
            "--body", "hello from node", "--key", "node-order-1", "--events", "1")

    code, lines = await run_worker(*args)
    assert code == 0, lines
    sent, status = lines
    assert sent["type"] == "sent" and sent["acked"] and not sent["duplicate"]
    assert sent["idempotencyKey"] == "node-order-1"
    assert status["type"] == "status" and status["sessionId"] == SID
    assert status["state"] == "OPEN" and status["snapshot"] and status["eventId"]
    accepted = sim.record(SID).accepted
    assert [(m.to, m.body, m.id) for m in accepted] == [
        ("+15550100", "hello from node", sent["messageId"])]

    # The same key again (a worker retrying after a crash): answered, not re-sent.
    code, lines = await run_worker(*args)
    assert code == 0, lines
    assert lines[0]["duplicate"] and lines[0]["messageId"] == sent["messageId"]
    assert len(sim.record(SID).accepted) == 1


async def test_worker_reports_the_machine_readable_reason(
    node_client: Path, broker: BrokerApp
) -> None:
    code, lines = await run_worker("--target", broker.address, "--session", "nobody",
                                   "--to", "+15550100", "--body", "hi")
    assert code == 1
    [error] = lines
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "SESSION_NOT_FOUND")


@pytest.mark.parametrize("coalesce", [True, False], ids=["coalescing", "unary"])
async def test_concurrent_sends_share_one_stream_in_order_and_send_many_types_errors(
    node_client: Path, sim: Simulator, broker: BrokerApp, coalesce: bool
) -> None:
    await paired_session(broker, sim, SID)
    args = ["--target", broker.address, "--session", SID, "--to", "+15550100",
            "--count", "50", "--prefix", "n"]
    code, lines = await run_worker(*args, *([] if coalesce else ["--no-coalesce"]),
                                   script="examples/bulk.js")
    assert code == 0, lines
    *results, summary = lines
    assert summary["streamsOpened"] == (1 if coalesce else 0)
    assert summary["coalesce"] is coalesce
    assert [r["type"] for r in results] == ["sent"] * 50 + ["error"] + ["sent"] * 49
    assert results[50] == {"type": "error", "code": "NOT_FOUND", "reason": "SESSION_NOT_FOUND"}
    assert all(r["acked"] for r in results if r["type"] == "sent")
    bodies = [m.body for m in sim.record(SID).accepted]
    # Each message once. Concurrent send() calls keep call order on the stream only:
    # unary calls reach the broker in no set order. sendMany keeps list order either
    # way (without the stream it sends the list with SendBatch).
    sent = [f"n {i}" for i in range(50)]
    assert (bodies[:50] if coalesce else sorted(bodies[:50])) == \
        (sent if coalesce else sorted(sent))
    assert bodies[50:] == [f"n many {i}" for i in range(1, 50)]


def test_node_unit_tests(node_client: Path) -> None:
    assert NODE is not None
    result = subprocess.run([NODE, "--test", "test/"], cwd=NODE_DIR, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
