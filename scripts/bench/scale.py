"""The control-plane scale scenario: many idle sessions on several brokers, one Redis.

Per size: a fresh Redis and `brokers` broker processes; every session created,
then timed until each is OPEN (placed and connected); then an idle window
measured with Redis's own `INFO commandstats` and `INFO cpu` deltas and each
broker's /proc CPU and RSS; then one broker SIGKILLed and timed until every
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


def _redis(appendonly: bool = True) -> Any:
    from tests.redis_server import RedisServer

    return RedisServer(appendonly=appendonly).start()


async def _info(client: Any) -> tuple[dict[str, int], float]:
    stats = await client.info("commandstats")
    cpu = await client.info("cpu")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _chunked(client: Any, ids: Sequence[str], op: str) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start:start + CHUNK]
        if op == "lease":
            out += await client.mget([KEYS.lease(s) for s in chunk])
        else:
            async with client.pipeline(transaction=False) as pipe:
                for sid in chunk:
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


async def _create(addresses: Sequence[str], ids: Sequence[str], timeout: float) -> None:
    """CreateSession each id, spread over the brokers, 64 in flight."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    try:
        stubs = [pb_grpc.BrokerStub(c) for c in channels]
        gate = asyncio.Semaphore(64)

        async def create(n: int, sid: str) -> None:
            async with gate:
                await stubs[n % len(stubs)].CreateSession(
                    pb.CreateSessionRequest(session_id=sid), timeout=timeout)

        await asyncio.gather(*(create(n, s) for n, s in enumerate(ids)))
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
                   workdir: Path) -> dict[str, Any]:
    import redis.asyncio as aioredis

    common.raise_nofile()
    redis = _redis()
    client = aioredis.Redis(host="127.0.0.1", port=redis.port)
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
                                                  store=redis.url, extra=extra, env=env,
                                                  timeout=60)
        addresses = [a for _, a in procs.values()]
        started = time.monotonic()
        place_timeout = max(120.0, n / 50)
        await _create(addresses, ids, timeout=60)
        created_s = time.monotonic() - started

        async def all_open() -> bool:
            if sim is None:
                return await _open_count(client, ids) == n
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
        calls0, rcpu0 = await _info(client)
        bcpu0 = {k: p.cpu_seconds() for k, (p, _) in procs.items()}
        t0 = time.monotonic()
        await asyncio.sleep(window_s)
        calls1, rcpu1 = await _info(client)
        elapsed = time.monotonic() - t0
        bcpu1 = {k: p.cpu_seconds() for k, (p, _) in procs.items()}
        delta = {c: calls1.get(c, 0) - calls0.get(c, 0) for c in calls1}
        delta = {c: d for c, d in delta.items() if d > 0 and c not in ("info",)}
        total = sum(delta.values())
        top = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:8])
        result: dict[str, Any] = {
            "sessions": n, "brokers": brokers, "engine": engine, "lease_ttl_s": ttl_s,
            "create_s": round(created_s, 1), "place_all_open_s": round(place_s, 1),
            "owners": dict(spread),
            "idle_window_s": round(elapsed, 1),
            "redis_commands_per_s": round(total / elapsed, 1),
            "redis_commands_per_session_per_s": round(total / elapsed / n, 4),
            "redis_commands_by_name_per_s": {c: round(d / elapsed, 1) for c, d in top.items()},
            "redis_cpu_share_of_core": round((rcpu1 - rcpu0) / elapsed, 4),
            "broker_cpu_share_of_core": {k: round((bcpu1[k] - bcpu0[k]) / elapsed, 4)
                                         for k in procs},
            "broker_rss_mb": {k: round(p.rss_bytes() / 2**20, 1) for k, (p, _) in procs.items()},
        }
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
        await client.aclose()
        redis.close()


async def scale(cfg: Any, workdir: Path) -> dict[str, Any]:
    sizes: dict[str, Any] = {}
    for n in cfg.scale_sizes:
        try:
            sizes[str(n)] = await one_size(n, brokers=cfg.scale_brokers, engine=cfg.scale_engine,
                                           window_s=cfg.scale_window_s, ttl_s=cfg.failover_ttl_s,
                                           workdir=workdir)
        except Exception as exc:  # report the largest size that fit, and why the next did not
            sizes[str(n)] = {"error": f"{type(exc).__name__}: {exc}"}
            break
    return {"sizes": sizes}
