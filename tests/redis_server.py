"""A real redis-server for tests: started on a free loopback port in a temp dir.

Tests exercise the Redis store against the real server (Lua, streams,
pub/sub, persistence across restarts), not a fake. Fixtures skip cleanly when
no redis-server binary is installed. Use from any test folder with
``from tests.redis_server import redis_server, shared_redis  # noqa: F401``
in its conftest.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
SERVER_ENV = "REDIS_SERVER"
"""Names the redis-server binary when it is not on PATH."""


def find_redis_server() -> str | None:
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `restart()` keeps port and dir, so AOF data survives."""

    def __init__(
        self, *, appendonly: bool = True, binary: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise FileNotFoundError(
                f"redis-server not found on PATH (install it, e.g. apt-get install redis-server, "
                f"or set {SERVER_ENV}=/path/to/redis-server)"
            )
        self.binary = found
        self.appendonly = appendonly
        self.extra_args = extra_args
        self._tmp = tempfile.TemporaryDirectory(prefix="broker-redis-")
        self.dir = Path(self._tmp.name)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start on a free port (a new one only the first time); waits for PING."""
        if self.running:
            return self
        attempts = 1 if self.port else 3  # a restart must keep its port
        for _ in range(attempts):
            port = self.port or _free_port()
            if self._launch(port):
                self.port = port
                return self
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def _launch(self, port: int) -> bool:
        args = [
            self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"), "--daemonize", "no",
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False  # e.g. the port was taken in the meantime
            if _ping(port):
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that flushes the append-only file."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: Redis stops answering but connections stay open, like a partition."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def flushall(self) -> None:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5) as client:
            client.flushall()
            client.script_flush()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_or_skip(*, appendonly: bool) -> RedisServer:
    if find_redis_server() is None:
        pytest.skip(
            f"redis-server not found: install it (apt-get install redis-server) or set "
            f"{SERVER_ENV} to run the Redis store tests"
        )
    # With append-only on, fsync every write: a test that SIGKILLs Redis asserts
    # that nothing acknowledged is lost, which `everysec` only promises up to a second.
    extra = ("--appendfsync", "always") if appendonly else ()
    return RedisServer(appendonly=appendonly, extra_args=extra).start()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private server (appendonly on) for tests that stop, kill or restart it."""
    server = _start_or_skip(appendonly=True)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def shared_redis_server() -> Iterator[RedisServer]:
    server = _start_or_skip(appendonly=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def shared_redis(shared_redis_server: RedisServer) -> RedisServer:
    """The session-wide server, emptied first: fast, isolated by FLUSHALL. Do not stop it."""
    if not shared_redis_server.running:
        shared_redis_server.start()
    shared_redis_server.flushall()
    return shared_redis_server
