"""A real 3-primary Redis Cluster for tests, on free loopback ports in a temp dir.

Three ``redis-server --cluster-enabled yes`` processes joined by
``redis-cli --cluster create ... --cluster-replicas 0``; the fixtures skip
cleanly when either binary is missing. `reshard` moves slots between primaries
with ``redis-cli --cluster reshard`` while clients keep running (slot migration:
MOVED and ASK redirections, TRYAGAIN on multi-key commands meanwhile).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from redis.cluster import RedisCluster as SyncCluster

from tests.redis_server import RedisServer, find_redis_server

READY_TIMEOUT_S = 30.0


def _free_cluster_port() -> int:
    """A port free for both the client and the cluster bus (port + 10000)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """Three primaries, no replicas. `url` is the broker's ``redis+cluster://`` store URL."""

    def __init__(self, primaries: int = 3, *, appendfsync: str = "always") -> None:
        self.nodes = [
            RedisServer(appendonly=True, extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "3000", "--appendfsync", appendfsync))
            for _ in range(primaries)
        ]
        cli = shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("redis-cli not found on PATH (it ships with redis-server)")
        self.cli = cli

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(self.addresses)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.port = _free_cluster_port()
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=READY_TIMEOUT_S)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(self._state_ok(node.port) for node in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    @staticmethod
    def _state_ok(port: int) -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
                info = client.execute_command("CLUSTER INFO")
        except redis.RedisError:
            return False
        if isinstance(info, dict):
            return info.get("cluster_state") == "ok"
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text

    def client(self) -> SyncCluster:
        return SyncCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def flushall(self) -> None:
        for node in self.nodes:
            with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) as client:
                client.flushall()
                client.script_flush()

    def node_ids(self) -> dict[int, str]:
        """Port -> cluster node id."""
        with redis.Redis(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5) as c:
            nodes = c.execute_command("CLUSTER NODES")  # parsed by redis-py: addr -> fields
        return {int(addr.split("@")[0].rsplit(":", 1)[1]): fields["node_id"]
                for addr, fields in nodes.items()}

    def slot_owner(self, slot: int) -> int:
        """The port of the primary serving `slot`."""
        with redis.Redis(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(primary[1])
        raise LookupError(slot)

    def reshard(self, from_port: int, to_port: int, slots: int,
                timeout_s: float = 120.0) -> None:
        """Move `slots` slots from one primary to another (keys migrate meanwhile)."""
        ids = self.node_ids()
        subprocess.run(
            [self.cli, "--cluster", "reshard", f"127.0.0.1:{from_port}",
             "--cluster-from", ids[from_port], "--cluster-to", ids[to_port],
             "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10"],
            check=True, capture_output=True, timeout=timeout_s)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_cluster_or_skip() -> RedisClusterServers:
    if find_redis_server() is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server and redis-cli are needed for the Redis Cluster tests")
    cluster = RedisClusterServers()
    try:
        return cluster.start()
    except BaseException:
        cluster.close()
        raise


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A private 3-primary cluster for tests that reshard or kill it."""
    cluster = start_cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def shared_redis_cluster_servers() -> Iterator[RedisClusterServers]:
    cluster = start_cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def shared_redis_cluster(shared_redis_cluster_servers: RedisClusterServers) -> RedisClusterServers:
    """The session-wide cluster, emptied first (FLUSHALL on every primary)."""
    shared_redis_cluster_servers.flushall()
    return shared_redis_cluster_servers
