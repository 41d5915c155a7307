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

    def migrate_slot(self, slot: int, to_port: int, *, keys_per_step: int = 5,
                     pause_s: float = 0.05, timeout_s: float = 60.0) -> int:
        """Move one slot the way ``redis-cli --cluster reshard`` does (SETSLOT IMPORTING
        and MIGRATING, MIGRATE a few keys at a time, SETSLOT NODE everywhere), paced
        by `pause_s` between steps so clients meet the half-moved slot. Returns how
        many keys moved."""
        from_port = self.slot_owner(slot)
        if from_port == to_port:
            return 0
        self.begin_migration(slot, to_port)
        return self.finish_migration(slot, from_port, to_port, keys_per_step=keys_per_step,
                                     pause_s=pause_s, timeout_s=timeout_s)

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark `slot` importing on `to_port` and migrating on its owner (no key moved
        yet); returns the owner's port."""
        from_port = self.slot_owner(slot)
        ids = self.node_ids()
        with redis.Redis(host="127.0.0.1", port=from_port, socket_timeout=10) as src, \
                redis.Redis(host="127.0.0.1", port=to_port, socket_timeout=10) as dst:
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[from_port])
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[to_port])
        return from_port

    def finish_migration(self, slot: int, from_port: int, to_port: int, *,
                         keys_per_step: int = 5, pause_s: float = 0.05,
                         timeout_s: float = 60.0) -> int:
        """MIGRATE the slot's keys a few at a time, then SETSLOT NODE everywhere."""
        ids = self.node_ids()
        moved = 0
        with redis.Redis(host="127.0.0.1", port=from_port, socket_timeout=10) as src, \
                redis.Redis(host="127.0.0.1", port=to_port, socket_timeout=10) as dst:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, keys_per_step)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(pause_s)
            else:
                raise RuntimeError(f"slot {slot} did not empty within {timeout_s} s")
            # The target first, then the source: the order redis-cli uses.
            dst.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to_port])
            src.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to_port])
        for node in self.nodes:
            if node.port not in (from_port, to_port):
                with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=10) as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[to_port])
        return moved

    def error_count(self, prefix: str) -> int:
        """Error replies starting with `prefix` (TRYAGAIN, ASK, ...) sent by all nodes."""
        total = 0
        for node in self.nodes:
            with redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=5) as c:
                stats = c.info("errorstats")
            count = stats.get(f"errorstat_{prefix}", {})
            total += int(count.get("count", 0)) if isinstance(count, dict) else 0
        return total

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
