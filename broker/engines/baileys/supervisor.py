"""Runs the Node.js bridge (engines/baileys) for this broker process.

One bridge per broker instance: started with a fresh secret on every start
(given on its stdin, never in argv, the environment or a log), restarted with
backoff when it exits, stopped with the broker. Its stdin stays open for its
whole life: if the broker dies, even by SIGKILL, the bridge sees stdin close
and exits, so no orphan holds WhatsApp sockets. The sessions' links see the
exit as a lost connection and reconnect through their own lifecycle; while
the bridge is down, `BridgeProvider.connect` fails with `reason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

log = logging.getLogger(__name__)

ENGINE_DIR = Path(__file__).resolve().parents[3] / "engines" / "baileys"
"""The bridge's Node package in this checkout."""

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 3.0
HEALTHY_AFTER_S = 30.0
"""A bridge that ran this long resets the restart backoff."""


class BridgeNotInstalled(OSError):
    """Node.js or the bridge's packages are missing: the message names the fix."""


class BridgeExited(Exception):
    """The bridge process ended (or never became ready)."""


def check_installed(engine_dir: Path = ENGINE_DIR, node: str = "node") -> str:
    """The path of `node`, or BridgeNotInstalled saying how to install what is missing."""
    found = shutil.which(node)
    if found is None:
        raise BridgeNotInstalled(
            "--engine baileys needs Node.js >= 20, and `node` is not on PATH: install it "
            "(e.g. `apt-get install nodejs npm`), then run `npm ci` in " f"{engine_dir}")
    if not (engine_dir / "node_modules" / "baileys").is_dir():
        raise BridgeNotInstalled(
            "--engine baileys: the bridge's packages are not installed: "
            f"run `npm ci` in {engine_dir}")
    return found


@dataclass
class BridgeState:
    """What Health and metrics say about the bridge."""

    up: bool = False
    pid: int | None = None
    starts: int = 0
    last_exit: str = ""
    since: float = field(default_factory=time.time)

    @property
    def reason(self) -> str:
        if self.up:
            return "up"
        return f"WhatsApp bridge down ({self.last_exit or 'starting'}); restarting"


class BridgeSupervisor:
    """Start, watch, restart and stop the bridge process."""

    def __init__(
        self, *, wa_version: tuple[int, int, int] | None = None, ws_url: str | None = None,
        engine_dir: Path = ENGINE_DIR, log_level: str = "warn",
        backoff_initial_s: float = 0.2, backoff_max_s: float = 30.0,
        max_media_bytes: int = 16 << 20,
    ) -> None:
        """`max_media_bytes`: the largest inbound medium the bridge downloads (larger
        ones arrive as metadata with the reason)."""
        self._node = check_installed(engine_dir)
        self._engine_dir = engine_dir
        self._start_settings = {"wa_version": list(wa_version) if wa_version else None,
                                "ws_url": ws_url, "log_level": log_level,
                                "max_media_bytes": max_media_bytes}
        self._wait = wait_exponential_jitter(multiplier=backoff_initial_s, max=backoff_max_s)
        self._dir = Path(tempfile.mkdtemp(prefix="broker-bridge-"))  # mode 0700
        self.socket_path = str(self._dir / "bridge.sock")
        self.secret = ""
        self.state = BridgeState()
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the bridge and wait until it listens (raises BridgeExited if it cannot)."""
        await self._start_once()
        self._task = asyncio.create_task(self._watch(), name="baileys-bridge")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._end_process()
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the bridge (tests: the supervisor must bring it back)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    async def _start_once(self) -> None:
        self.secret = secrets.token_urlsafe(32)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self.state.starts += 1
        proc = await asyncio.create_subprocess_exec(
            self._node, str(self._engine_dir / "src" / "main.js"), cwd=str(self._engine_dir),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        settings = {**self._start_settings, "secret": self.secret, "socket_path": self.socket_path}
        proc.stdin.write(json.dumps(settings).encode() + b"\n")
        await proc.stdin.drain()
        self._log_task = asyncio.create_task(self._forward_logs(proc.stderr),
                                             name="baileys-bridge-log")
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b""
        if not line.startswith(b'{"t":"ready"'):
            await self._end_process()
            raise BridgeExited(f"the bridge did not start (exit {proc.returncode})")
        self.state.up, self.state.pid, self.state.since = True, proc.pid, time.time()
        log.info("WhatsApp bridge up (pid %s)", proc.pid)

    async def _watch(self) -> None:
        """Restart the bridge whenever it exits, for as long as the broker runs: at once
        after a healthy run, with growing (jittered) waits while it keeps dying early."""
        while not self._stopping:
            retrying = AsyncRetrying(wait=self._wait, retry=retry_if_exception_type(BridgeExited),
                                     reraise=True)
            async for attempt in retrying:
                with attempt:
                    await self._run_until_exit()

    async def _run_until_exit(self) -> None:
        if not self.state.up:
            await self._start_once()
        assert self._proc is not None
        code = await self._proc.wait()
        ran_s = time.time() - self.state.since
        self.state.up, self.state.pid = False, None
        self.state.last_exit = f"exited with {code}"
        log.warning("WhatsApp bridge exited with %s after %.1f s; restarting", code, ran_s)
        if ran_s < HEALTHY_AFTER_S:
            raise BridgeExited(self.state.last_exit)

    async def _end_process(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # the bridge exits when its stdin closes
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    @staticmethod
    async def _forward_logs(stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            log.warning("%s", line.decode(errors="replace").rstrip()[:500])
