"""The bridge's own unit tests (`node --test`), run as part of the Python suite."""

from __future__ import annotations

import subprocess

from broker.engines.baileys.supervisor import ENGINE_DIR
from tests.engines.baileys_support import needs_bridge


@needs_bridge
def test_node_bridge_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(ENGINE_DIR)) for p in (ENGINE_DIR / "test").glob("*.test.js"))
    assert tests
    run = subprocess.run(["node", "--test", *tests], cwd=ENGINE_DIR, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout
