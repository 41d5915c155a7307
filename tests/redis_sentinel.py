"""A real Sentinel-managed Redis for tests: one primary, one replica, three Sentinels.

All on free loopback ports in temp dirs (``redis-server --sentinel``), so a test
can SIGKILL the primary and watch the Sentinels promote the replica. The
fixtures skip cleanly without a redis-server binary.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.redis_server import RedisServer, _free_port, find_redis_server

SERVICE = "brokerdb"
READY_TIMEOUT_S = 30.0


class _SentinelProcess:
    def __init__(self, binary: str, primary_port: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="broker-sentinel-")
        self.dir = Path(self._tmp.name)
        self.port = _free_port()
        conf = self.dir / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
            f"logfile {self.dir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2",
            f"sentinel down-after-milliseconds {SERVICE} 1000",
            f"sentinel failover-timeout {SERVICE} 3000",
            f"sentinel parallel-syncs {SERVICE} 1", "",
        ]))
        self.proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._tmp.cleanup()


class SentinelGroup:
    """`url` is the broker's ``redis+sentinel://`` store URL."""

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server not found")
        self.binary = binary
        fsync = ("--appendfsync", "always")
        self.primary = RedisServer(appendonly=True, extra_args=fsync)
        self.replica: RedisServer | None = None
        self.sentinels: list[_SentinelProcess] = []

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{SERVICE}"

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica = RedisServer(appendonly=True, extra_args=(
            "--appendfsync", "always", "--replicaof", "127.0.0.1", str(self.primary.port)))
        self.replica.start()
        self.sentinels = [_SentinelProcess(self.binary, self.primary.port) for _ in range(3)]
        self._wait(self._ready, "the replica in sync and the Sentinels agreeing")
        return self

    def _wait(self, check: object, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def _ready(self) -> bool:
        with redis.Redis(host="127.0.0.1", port=self.primary.port, socket_timeout=2) as c:
            info = c.info("replication")
        if info.get("connected_slaves") != 1 or "online" not in str(info.get("slave0", "")):
            return False
        for sentinel in self.sentinels:
            with sentinel.client() as c:
                if len(c.sentinel_slaves(SERVICE)) != 1 or len(c.sentinel_sentinels(SERVICE)) != 2:
                    return False
        return True

    def primary_port(self) -> int:
        """The port the Sentinels name as the primary now."""
        with self.sentinels[0].client() as c:
            _host, port = c.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def cut_off_replica(self) -> None:
        """Freeze the replica (SIGSTOP) and fill the replication link's socket buffers,
        so writes from now on stay in the primary's output buffer: a primary killed
        next dies with writes the replica never receives, even once it is thawed."""
        assert self.replica is not None
        self.replica.freeze()
        with redis.Redis(host="127.0.0.1", port=self.primary.port, socket_timeout=10) as c:
            c.set("replication-filler", b"x" * (32 << 20))

    def wait_promoted(self, old_port: int) -> int:
        ports: list[int] = []

        def promoted() -> bool:
            ports[:] = [self.primary_port()]
            return ports[0] != old_port

        self._wait(promoted, "the Sentinels to promote the replica")
        return ports[0]

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        for server in (self.primary, self.replica):
            if server is not None:
                server.close()

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def sentinel_group() -> Iterator[SentinelGroup]:
    if find_redis_server() is None:
        pytest.skip("redis-server is needed for the Sentinel tests")
    group = SentinelGroup()
    try:
        yield group.start()
    finally:
        group.close()
