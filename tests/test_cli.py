"""The README tour, run as a person would: `broker serve` with no configuration,
then the people commands in another process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT_S = 30


@contextlib.contextmanager
def serving(data_dir: Path, log: Path) -> Iterator[tuple[str, str]]:
    """`broker serve` with no configuration but its data directory (and free ports)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "serve", "--listen", "127.0.0.1:0",
             "--sim-port", "0"], stdout=out, stderr=out,
            env=os.environ | {"BROKER_DATA_DIR": str(data_dir)},
        )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            text = log.read_text()
            target = re.search(r"broker listening on (\S+)", text)
            control = re.search(r"control: (http://\S+)\)", text)
            if target and control:
                yield target.group(1), control.group(1)
                break
            assert proc.poll() is None, text
            time.sleep(0.05)
        else:
            raise AssertionError(f"broker serve did not start:\n{log.read_text()}")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT_S) == 0, log.read_text()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    with serving(tmp_path / "data", tmp_path / "serve.log") as addresses:
        yield addresses


def broker(*args: str, ok: bool = True) -> str:
    result = subprocess.run([sys.executable, "-m", "broker.cli", *args], capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result.stdout + result.stderr


def until(check: str, *args: str) -> str:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        out = broker(*args)
        if check in out or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def test_the_readme_tour(served: tuple[str, str]) -> None:
    target, control = served
    t = ("--target", target)
    assert "962302" in broker("sessions", "create", "962302", *t)
    assert "PAIRING" in until("PAIRING", "sessions", "get", "962302", *t)
    qr = broker("qr", "962302", *t)
    assert "QR #1 for 962302" in qr and "█" in qr
    assert '"scanned": true' in broker("sim", "scan", "962302", "--url", control)
    assert "OPEN" in until("OPEN", "sessions", "get", "962302", *t)
    assert re.search(r"m-\w+ acked", broker("send", "962302", "+15550100", "hello", *t))
    assert "OPEN (snapshot)" in broker("watch", "962302", "--count", "1", *t)
    broker("sim", "drop", "962302", "--url", control)
    health = until("disconnects last hour 1", "health", "962302", *t)
    assert "disconnects last hour 1" in health
    broker("sim", "logout", "962302", "--url", control)
    assert "LOGGED_OUT" in until("LOGGED_OUT", "sessions", "get", "962302", *t)
    refused = broker("send", "962302", "+15550100", "again", *t, ok=False)
    assert "FAILED_PRECONDITION LOGGED_OUT" in refused
    assert "REPAIR_NEEDED" in broker("health", "962302", *t)
    assert "SESSION_NOT_FOUND" in broker("send", "nope", "+1", "x", *t, ok=False)


def test_the_first_command_keeps_a_paired_session_across_a_restart(tmp_path: Path) -> None:
    """The README's first command, twice: the second run needs no QR code."""
    data = tmp_path / "data"
    with serving(data, tmp_path / "first.log") as (target, control):
        t = ("--target", target)
        broker("sessions", "create", "962302", *t)
        assert "PAIRING" in until("PAIRING", "sessions", "get", "962302", *t)
        assert '"scanned": true' in broker("sim", "scan", "962302", "--url", control)
        assert "OPEN" in until("OPEN", "sessions", "get", "962302", *t)
        assert re.search(r"m-\w+ acked", broker("send", "962302", "+15550100", "one", *t))
    first_log = (tmp_path / "first.log").read_text()
    key_file = data / "credentials.key"
    assert f"created the credential key file {key_file}" in first_log
    assert "every session must be paired again" in first_log
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (data / "broker.db").is_file() and (data / "simulator.json").is_file()

    with serving(data, tmp_path / "second.log") as (target, control):
        t = ("--target", target)
        assert "OPEN" in until("OPEN", "sessions", "get", "962302", *t)
        assert re.search(r"m-\w+ acked", broker("send", "962302", "+15550100", "two", *t))
        record = json.loads(broker("sim", "record", "962302", "--url", control))
        assert record["qr_codes_sent"] == 0  # this run's simulator never showed a QR code
        assert [m["body"] for m in record["accepted"]] == ["two"]
    assert "created the credential key file" not in (tmp_path / "second.log").read_text()
