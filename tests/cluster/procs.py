"""Broker instances as real OS processes, so tests can SIGKILL and SIGSTOP them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 20.0
_LISTENING = re.compile(r"broker listening on (\S+)")

ProcessFactory = Callable[..., "BrokerProcess"]

FAST_FLAGS = (
    "--backoff-initial", "0.05", "--backoff-max", "0.3", "--keepalive-interval", "1",
    "--keepalive-timeout", "2", "--conflict-retry", "0", "--max-attempts", "0",
    "--ack-timeout", "1",
)


class BrokerProcess:
    def __init__(self, name: str, store_url: str, upstream_url: str, workdir: Path,
                 env: dict[str, str], extra: tuple[str, ...], module: str = "broker.cli") -> None:
        """`module`: what `python -m` runs (`tests.faults.hog`: a broker that can be
        kept busy)."""
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.args = [
            sys.executable, "-m", module, "serve", "--listen", "127.0.0.1:0",
            "--store", store_url, "--upstream-url", upstream_url, "--instance-id", name,
            *FAST_FLAGS, *extra,
        ]
        self.env = os.environ | {"BROKER_DATA_DIR": str(workdir / f"{name}-data")} | env
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> None:
        # The log is appended to across restarts of one name: read only this start's part.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                match = _LISTENING.search(log.read().decode(errors="replace"))
            if match:
                self.address = match.group(1)
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"broker {self.name} did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
