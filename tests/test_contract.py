"""The committed stubs are exactly what proto/ generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    """The check itself can fail: a stub edited by hand is reported."""
    stubs = ROOT / "clients" / "python" / "broker_client" / "v1"
    copy = tmp_path / "v1"
    shutil.copytree(stubs, copy)
    (copy / "broker_pb2.py").write_text((copy / "broker_pb2.py").read_text() + "# edited\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check", "--out", str(copy)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "broker_pb2.py" in result.stdout
