"""What `--engine baileys` says when Node.js or the bridge's packages are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.cli import main
from broker.engines.baileys import parse_wa_version
from broker.engines.baileys.supervisor import BridgeNotInstalled, check_installed


def test_missing_node_names_the_fix() -> None:
    with pytest.raises(BridgeNotInstalled, match=r"Node.js >= 20.*npm ci"):
        check_installed(node="no-such-node-binary")


def test_missing_packages_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(BridgeNotInstalled, match=rf"npm ci` in {tmp_path}"):
        check_installed(engine_dir=tmp_path)


def test_serve_without_node_is_a_clear_error_not_a_stack_trace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no node on it
    result = CliRunner().invoke(main, ["serve", "--engine", "baileys", "--store", "memory://",
                                       "--listen", "127.0.0.1:0"])
    assert result.exit_code != 0
    assert "Node.js >= 20" in result.output and "npm ci" in result.output
    assert "Traceback" not in result.output


def test_wa_version_is_three_numbers() -> None:
    assert parse_wa_version("2.3000.1023223821") == (2, 3000, 1023223821)
    assert parse_wa_version(None) is None
    with pytest.raises(ValueError, match="--wa-version"):
        parse_wa_version("latest")
