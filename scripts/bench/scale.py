"""The control-plane scale scenario: many idle sessions on several brokers, on one
Redis or a 3-primary Redis Cluster (`redis="cluster"`).

Per size: a fresh Redis (or cluster) and `brokers` broker processes; every session created,
then timed until each is OPEN (placed and connected); then an idle window
measured with Redis's own `INFO commandstats` and `INFO cpu` deltas (per primary
on the cluster) and each broker's /proc CPU and RSS; then one broker SIGKILLed and timed until every
session it owned is owned by a survivor again. With `engine="null"` the
sessions need no sockets (`null://`, bench-only); with `engine="sim"` they are
paired against a simulator hosted in this process.

The driver's own progress reads (lease and last-event keys, in pipelined
chunks) happen outside the idle window.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from broker.lifecycle.states import State
from broker.store.base import event_from_json
from broker.store.redis.keys import RedisKeys
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from scripts.bench import common
from scripts.bench.common import Proc

KEYS = RedisKeys()
CHUNK = 5000


class _Target:
    """Where the brokers keep their state: one redis-server or a 3-primary cluster."""

    def __init__(self, kind: str) -> None:
        import redis.asyncio as aioredis

        from broker.store.redis import connect

        self.kind = kind
        if kind == "cluster":
            from tests.redis_cluster import RedisClusterServers

            self.cluster: Any = RedisClusterServers(appendfsync="everysec").start()
            self.url = self.cluster.url
            self.ports = [node.port for node in self.cluster.nodes]
            self.client: Any = connect.cluster(self.url)
        else:
            from tests.redis_server import RedisServer

            self.server: Any = RedisServer(appendonly=True).start()
            self.url = self.server.url
            self.ports = [self.server.port]
            self.client = aioredis.Redis(host="127.0.0.1", port=self.server.port)
        self.nodes = [aioredis.Redis(host="127.0.0.1", port=p) for p in self.ports]

    async def close(self) -> None:
        for node in self.nodes:
            await node.aclose()
        await self.client.aclose()
        (self.cluster if self.kind == "cluster" else self.server).close()


async def _info(node: Any) -> tuple[dict[str, int], float]:
    stats = await node.info("commandstats")
    cpu = await node.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _chunked(client: Any, ids: Sequence[str], op: str) -> list[Any]:
    """One GET / HGET per session, pipelined in chunks (also across cluster slots)."""
    out: list[Any] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        async with client.pipeline(transaction=False) as pipe:
            for sid in chunk:
                if op == "lease":
                    pipe.get(KEYS.lease(sid))
                else:
                    pipe.hget(KEYS.last(sid), "event")
            out += await pipe.execute()
    return out


def _holder(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode().split(":", 1)[0]


async def _owners(client: Any, ids: Sequence[str]) -> dict[str, str | None]:
    return dict(zip(ids, map(_holder, await _chunked(client, ids, "lease")), strict=True))


async def _open_count(client: Any, ids: Sequence[str]) -> int:
    rows = await _chunked(client, ids, "last")
    return sum(1 for raw in rows if raw is not None and event_from_json(raw).state == State.OPEN)


async def _why(client: Any, last: dict[str, bytes | None]) -> str:
    """What holds the sessions not OPEN yet, when few are left: their lease holders
    and last states (a tail that does not drain says where it is stuck)."""
    if not last or len(last) > 5_000:
        return ""
    holders = await _owners(client, list(last))
    seen = collections.Counter(
        (holders[sid] or "no lease", "no state" if raw is None else event_from_json(raw).state.name)
        for sid, raw in last.items())
    return "; not OPEN: " + ", ".join(f"{h} {st} {c}" for (h, st), c in seen.most_common(8))


PROGRESS_EVERY = 10_000
CREATE_ATTEMPTS = 3
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
"""CreateSession is idempotent: these are tried again (on the next broker), counted."""


async def _create(addresses: Sequence[str], ids: Sequence[str], timeout: float,
                  retried: collections.Counter[str]) -> None:
    """CreateSession each id, spread over the brokers, 64 in flight; prints progress,
    and a failure says how far creation got."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    started = time.monotonic()
    done = 0
    try:
        stubs = [pb_grpc.BrokerStub(c) for c in channels]
        gate = asyncio.Semaphore(64)

        async def create(n: int, sid: str) -> None:
            nonlocal done
            async with gate:
                for attempt in range(CREATE_ATTEMPTS):  # as a client would: same id again
                    try:
                        await stubs[(n + attempt) % len(stubs)].CreateSession(
                            pb.CreateSessionRequest(session_id=sid), timeout=timeout)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if (exc.code() not in RETRIED or attempt == CREATE_ATTEMPTS - 1):
                            raise
                        retried[exc.code().name] += 1
            done += 1
            if done % PROGRESS_EVERY == 0:
                print(f"    created {done:,} of {len(ids):,} after "
                      f"{time.monotonic() - started:.0f}s", flush=True)

        await asyncio.gather(*(create(n, s) for n, s in enumerate(ids)))
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(f"CreateSession failed after {done:,} of {len(ids):,} were created "
                           f"in {time.monotonic() - started:.0f}s: {exc.code().name} "
                           f"{exc.details()}") from exc
    finally:
        for channel in channels:
            await channel.close(None)


async def _until(what: str, check: Any, timeout: float, every: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(every)
    raise RuntimeError(f"{what}: not within {timeout:.0f}s")


async def one_size(n: int, *, brokers: int, engine: str, window_s: float, ttl_s: float,
                   workdir: Path, redis: str = "single") -> dict[str, Any]:
    common.raise_nofile()
    target = await asyncio.to_thread(_Target, redis)
    client = target.client
    sim: Any = None
    procs: dict[str, tuple[Proc, str]] = {}
    ids = [f"sc-{i:06d}" for i in range(n)]
    try:
        if engine == "sim":
            from broker.simulator import Simulator, SimulatorConfig

            sim = Simulator(SimulatorConfig(idle_timeout_s=90.0, qr_interval_s=300.0, qr_max=5))
            await sim.start("127.0.0.1", 0)
            upstream = sim.url
        else:
            upstream = "null://"
        extra = ("--lease-ttl", str(ttl_s), "--log-level", "warning",
                 "--keepalive-interval", "30")
        env = common.credential_env()
        for b in range(brokers):
            name = f"sc{n}-b{b}"
            procs[name] = await asyncio.to_thread(common.broker, name, workdir, upstream,
                                                  store=target.url, extra=extra, env=env,
                                                  timeout=60)
        addresses = [a for _, a in procs.values()]
        started = time.monotonic()
        place_timeout = max(120.0, n / 50)
        retried: collections.Counter[str] = collections.Counter()
        await _create(addresses, ids, timeout=60, retried=retried)
        created_s = time.monotonic() - started
        print(f"  scale {n}: created in {created_s:.1f}s", flush=True)

        waiting = list(ids)
        reported = [time.monotonic()]

        async def all_open() -> bool:
            nonlocal waiting
            if sim is None:
                # Only what was not OPEN yet (100,000 reads a poll would compete with
                # the brokers for the CPU), then all of them once more, together.
                rows = await _chunked(client, waiting, "last")
                last = {sid: raw for sid, raw in zip(waiting, rows, strict=True)
                        if raw is None or event_from_json(raw).state != State.OPEN}
                waiting = list(last)
                if waiting:
                    if time.monotonic() - reported[0] >= 30:
                        reported[0] = time.monotonic()
                        print(f"    {n - len(waiting):,} of {n:,} OPEN after "
                              f"{reported[0] - started:.0f}s{await _why(client, last)}",
                              flush=True)
                    return False
                if await _open_count(client, ids) == n:
                    return True
                waiting = list(ids)
                return False
            # A session handed over while it paired shows a new QR: scan until all open.
            rows = await _chunked(client, ids, "last")
            waiting = [sid for sid, raw in zip(ids, rows, strict=True)
                       if raw is None or event_from_json(raw).state != State.OPEN]
            for sid in waiting:
                await sim.scan(sid)
            return not waiting

        await _until("every session OPEN", all_open, place_timeout, 1.0)
        place_s = time.monotonic() - started
        owners = await _owners(client, ids)
        spread = collections.Counter(owners.values())

        await asyncio.sleep(ttl_s)  # past the first renewals and claim rounds
        before = [await _info(node) for node in target.nodes]
        bcpu0 = {k: p.cpu_seconds() for k, (p, _) in procs.items()}
        t0 = time.monotonic()
        await asyncio.sleep(window_s)
        after = [await _info(node) for node in target.nodes]
        elapsed = time.monotonic() - t0
        bcpu1 = {k: p.cpu_seconds() for k, (p, _) in procs.items()}
        per_node: dict[str, Any] = {}
        delta: collections.Counter[str] = collections.Counter()
        rcpu = 0.0
        for port, (calls0, cpu0), (calls1, cpu1) in zip(target.ports, before, after,
                                                         strict=True):
            node_delta = {c: calls1.get(c, 0) - calls0.get(c, 0) for c in calls1}
            node_delta = {c: d for c, d in node_delta.items() if d > 0 and c != "info"}
            delta.update(node_delta)
            rcpu += cpu1 - cpu0
            per_node[str(port)] = {
                "commands_per_s": round(sum(node_delta.values()) / elapsed, 1),
                "cpu_share_of_core": round((cpu1 - cpu0) / elapsed, 4)}
        total = sum(delta.values())
        top = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:8])
        result: dict[str, Any] = {
            "sessions": n, "brokers": brokers, "engine": engine, "redis": redis,
            "lease_ttl_s": ttl_s,
            "create_s": round(created_s, 1), "place_all_open_s": round(place_s, 1),
            "create_retried": dict(retried),
            "owners": dict(spread),
            "idle_window_s": round(elapsed, 1),
            "redis_commands_per_s": round(total / elapsed, 1),
            "redis_commands_per_session_per_s": round(total / elapsed / n, 4),
            "redis_commands_by_name_per_s": {c: round(d / elapsed, 1) for c, d in top.items()},
            "redis_cpu_share_of_core": round(rcpu / elapsed, 4),
            "broker_cpu_share_of_core": {k: round((bcpu1[k] - bcpu0[k]) / elapsed, 4)
                                         for k in procs},
            "broker_rss_mb": {k: round(p.rss_bytes() / 2**20, 1) for k, (p, _) in procs.items()},
        }
        if redis == "cluster":
            result["per_primary"] = per_node
        print(f"  scale {n}: placed in {place_s:.1f}s; idle Redis "
              f"{result['redis_commands_per_s']} cmd/s = "
              f"{result['redis_commands_per_session_per_s']} per session per s", flush=True)

        victim = max(procs, key=lambda k: spread.get(k, 0))
        moved = [s for s, o in owners.items() if o == victim]
        survivors = set(procs) - {victim}
        procs[victim][0].kill(signal.SIGKILL)

        async def all_owned() -> bool:
            now = await _owners(client, moved)
            return all(o in survivors for o in now.values())

        owned_s = await _until("failover", all_owned, 6 * ttl_s + n / 200, 0.25)
        result["failover"] = {"killed": victim, "sessions_moved": len(moved),
                              "kill_to_all_owned_s": round(owned_s, 2)}
        print(f"  scale {n}: SIGKILL {victim} ({len(moved)} sessions): all owned again "
              f"after {owned_s:.1f}s", flush=True)
        return result
    finally:
        for proc, _ in procs.values():
            proc.stop()
        if sim is not None:
            await sim.stop()
        await target.close()


async def scale(cfg: Any, workdir: Path) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for n in cfg.scale_sizes:
        try:
            sizes[str(n)] = await one_size(n, brokers=cfg.scale_brokers, engine=cfg.scale_engine,
                                           window_s=cfg.scale_window_s,
                                           ttl_s=cfg.scale_ttl_s or cfg.failover_ttl_s,
                                           workdir=workdir, redis=cfg.scale_redis)
        except Exception as exc:  # report the largest size that fit, and why the next did not
            sizes[str(n)] = {"error": f"{type(exc).__name__}: {exc}"}
            break
    return {"sizes": sizes}
