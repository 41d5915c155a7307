"""The scenarios: each starts its processes, drives them, returns plain numbers.

Every process is separate (broker, simulator, load client, floors) except where
the issue allows otherwise (the 10k-session scenario hosts the simulator in the
driver so it can scan 10k QR codes without 10k HTTP requests).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.states import SPACED_OUT
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from scripts.bench import common
from scripts.bench.common import Proc, acontrol, summary_ms
from scripts.bench.profile import profile_pid
from scripts.bench.scale import scale


@dataclass(frozen=True)
class Config:
    mode: str
    concurrencies: tuple[int, ...] = (1, 16, 64)
    warmup_s: float = 1.0
    duration_s: float = 5.0
    #: Every path once per repetition, interleaved; ratios are the median of the
    #: repetitions' own (report.paired_ratio): with 2 that median is a mean, and
    #: one slow stretch of the machine moves it by half its size.
    reps: int = 3
    profile: bool = True
    profile_s: float = 8.0
    fanout_subscribers: int = 1000
    fanout_changes: int = 10
    idle_sessions: int = 10_000
    idle_window_s: float = 60.0
    idle_keepalive_s: float = 30.0
    idle_settle_s: float = 3.0
    reconnect_sessions: int = 200
    reconnect_gap_s: float = 0.1
    flap_s: float = 120.0
    flap_drain_s: float = 90.0
    failover_rounds: int = 2
    failover_ttl_s: float = 10.0
    failover_sessions: int = 6
    #: Many sessions: session counts, each with the matching total in flight.
    many_sessions: tuple[int, ...] = (100, 1000)
    many_in_flight: tuple[int, ...] = (64, 1024)
    #: Fairness: the flooding neighbour's items in flight (SendStream).
    fairness_flood: int = 256
    scale_sizes: tuple[int, ...] = (1000, 10_000, 100_000)
    scale_brokers: int = 4
    scale_engine: str = "null"
    scale_redis: str = "single"
    scale_ttl_s: float = 0.0
    """The scale brokers' lease TTL; 0: the failover TTL."""
    """"single" (one redis-server) or "cluster" (3 primaries)."""
    scale_window_s: float = 30.0
    extra_profiles: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Config] = {
    "full": Config("full"),
    "quick": Config("quick", warmup_s=0.5, duration_s=2.0, reps=1, profile_s=4.0,
                    fanout_changes=5, idle_sessions=1000, idle_window_s=30.0,
                    reconnect_sessions=50, flap_s=20.0, flap_drain_s=60.0,
                    failover_rounds=1, failover_ttl_s=5.0, failover_sessions=4,
                    scale_sizes=(1000,), scale_window_s=20.0),
    "smoke": Config("smoke", concurrencies=(4,), warmup_s=0.1, duration_s=0.4, reps=1,
                    profile=False, fanout_subscribers=10, fanout_changes=1, idle_sessions=5,
                    idle_window_s=0.5, idle_settle_s=0.2, reconnect_sessions=2,
                    flap_s=1.0, flap_drain_s=15.0, failover_rounds=1, failover_ttl_s=1.5,
                    failover_sessions=2, many_sessions=(3, 6), many_in_flight=(4, 8),
                    fairness_flood=8,
                    scale_sizes=(20,), scale_brokers=2,
                    scale_window_s=1.0),
}


def _stub(channel: grpc.aio.Channel) -> pb_grpc.BrokerAsyncStub:
    return pb_grpc.BrokerStub(channel)


async def _ready_all(procs: Sequence[Proc]) -> list[dict[str, Any]]:
    return await asyncio.gather(*(asyncio.to_thread(p.ready) for p in procs))


async def _broker(name: str, workdir: Path, upstream: str, **kw: Any) -> tuple[Proc, str]:
    return await asyncio.to_thread(common.broker, name, workdir, upstream, **kw)


async def _load(name: str, workdir: Path, args: list[str], timeout: float) -> dict[str, Any]:
    proc = common.role(name, "load", args, workdir)
    try:
        return await asyncio.to_thread(proc.result, timeout)
    finally:
        proc.kill()


async def _session_state(address: str, session_id: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        session = await _stub(channel).GetSession(pb.GetSessionRequest(session_id=session_id),
                                                  timeout=10)
        return int(session.state)


async def _wait_open(address: str, session_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _session_state(address, session_id) == pb.OPEN:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{session_id} not OPEN within {timeout}s")


# -- 1 (and the floors): Send throughput and latency ----------------------------------

async def send(cfg: Config, workdir: Path) -> dict[str, Any]:
    """Floors and the broker (memory, Redis), interleaved per concurrency and repetition;
    the best repetition of each point counts (the machine is shared and noisy)."""
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "send-sim", workdir)
    redis = _redis()
    procs: list[Proc] = [sim]
    try:
        echo = common.role("echo", "servers", ["echo"], workdir)
        relay = common.role("relay", "servers", ["relay", "--upstream-url", upstream,
                                                 "--control-url", ctl], workdir)
        aio = common.role("http-relay", "servers", ["http-relay", "--upstream-url", upstream,
                                                    "--control-url", ctl], workdir)
        express = common.node_peer("express-relay", workdir, upstream, ctl)
        procs += [echo, relay, aio, express]
        env = common.credential_env()
        (mem, mem_addr), (lite, lite_addr), (red, red_addr) = await asyncio.gather(
            _broker("broker-memory", workdir, upstream),
            _broker("broker-sqlite", workdir, upstream,
                    store=f"sqlite://{workdir / 'broker-sqlite.db'}"),
            _broker("broker-redis", workdir, upstream, store=redis.url, env=env),
        )
        procs += [mem, lite, red]
        echo_info, relay_info, aio_info, express_info = await _ready_all(
            [echo, relay, aio, express])
        await asyncio.gather(common.pair_sessions(mem_addr, ctl, ["s-mem"]),
                             common.pair_sessions(lite_addr, ctl, ["s-sqlite"]),
                             common.pair_sessions(red_addr, ctl, ["s-redis"]))
        targets: dict[str, list[str]] = {
            "grpc_echo": ["send", "--target", echo_info["address"], "--session", "s-echo"],
            "upstream_ws": ["ws", "--upstream-url", upstream, "--control-url", ctl],
            "relay": ["send", "--target", relay_info["address"], "--session", "s-relay"],
            "aiohttp": ["http", "--target", aio_info["url"], "--session", "s-aiohttp"],
            "express": ["http", "--target", express_info["url"], "--session", "s-express"],
            "memory": ["send", "--target", mem_addr, "--session", "s-mem"],
            "sqlite": ["send", "--target", lite_addr, "--session", "s-sqlite"],
            "redis": ["send", "--target", red_addr, "--session", "s-redis"],
            "memory_stream": ["stream", "--target", mem_addr, "--session", "s-mem"],
            "memory_batch": ["batch", "--target", mem_addr, "--session", "s-mem",
                             "--batch", "16"],
            "redis_stream": ["stream", "--target", red_addr, "--session", "s-redis"],
            "client": ["client", "--target", mem_addr, "--session", "s-mem"],
            "client_unary": ["client", "--target", mem_addr, "--session", "s-mem",
                             "--no-coalesce"],
        }
        # Whose CPU each target's requests cost (besides the load's own): the machine's
        # two cores are shared, so a path's throughput is bounded by the sum.
        servers: dict[str, Proc] = {
            "grpc_echo": echo, "relay": relay, "aiohttp": aio, "express": express,
            "memory": mem, "sqlite": lite, "redis": red, "memory_stream": mem,
            "memory_batch": mem, "redis_stream": red, "client": mem, "client_unary": mem}
        cpu_of: dict[str, list[str]] = {}
        for target in targets:
            spec = [f"sim={sim.pid}"]
            if target in servers:
                spec.append(f"server={servers[target].pid}")
            if target.startswith("redis") and redis.pid is not None:
                spec.append(f"redis={redis.pid}")
            cpu_of[target] = [arg for s in spec for arg in ("--cpu-of", s)]
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {t: {} for t in targets}
        for rep in range(cfg.reps):
            for c in cfg.concurrencies:
                for target, base in targets.items():
                    args = [*base]
                    if target == "upstream_ws":
                        args += ["--session", f"s-ws-{rep}-{c}"]
                    args += ["--concurrency", str(c), "--warmup", str(cfg.warmup_s),
                             "--duration", str(cfg.duration_s),
                             # keys of their own: several targets send as s-mem, and a
                             # key sent before is answered from the store, not sent
                             "--prefix", f"r{rep}c{c}{target}", *cpu_of[target]]
                    timeout = cfg.warmup_s + cfg.duration_s + 60
                    out = await _load(f"load-{target}-{rep}-{c}", workdir, args, timeout)
                    runs[target].setdefault(c, []).append(out)
                    print(f"  send {target:12s} c={c:<3d} rep {rep}: "
                          f"{out['throughput_rps']:8.1f} rps  p50 {out['p50_ms']:7.2f} ms  "
                          f"p99 {out['p99_ms']:7.2f} ms  errors {out['errors']}  "
                          f"cpu us/req {out.get('cpu_us_per_request', {})}", flush=True)
        result: dict[str, Any] = {}
        for target, per_c in runs.items():
            # the best repetition, with every repetition's rate in run order: the
            # peer ratios pair the paths' rates rep by rep (report.paired_ratio)
            result[target] = {str(c): {**max(outs, key=lambda o: o["throughput_rps"]),
                                       "reps_rps": [o["throughput_rps"] for o in outs]}
                              for c, outs in per_c.items()}
        if cfg.profile:
            top = max(cfg.concurrencies)
            result["profiles"] = {}
            for target, proc in (("memory", mem), ("sqlite", lite), ("redis", red)):
                result["profiles"][target] = await _profiled(
                    cfg, workdir, proc, [*targets[target], "--concurrency", str(top),
                                         "--warmup", "0.5", "--duration",
                                         str(cfg.profile_s + 1), "--prefix", "prof"],
                    f"profile-{target}")
        lite.stop()  # it logs how many transactions its writes took
        result["sqlite_group_commit"] = _group_commit(lite.log_path.read_text(errors="replace"))
        return result
    finally:
        for p in procs:
            p.stop()
        redis.close()


_GROUP_COMMIT = re.compile(r"SQLite store .+?: (\d+) writes in (\d+) transactions "
                           r"\(outbox: (\d+) messages and (\d+) acks\)")


def _group_commit(log: str) -> dict[str, Any]:
    """Messages and acks per SQLite transaction over the whole run (all its writes:
    outbox batches, events, ...)."""
    found = _GROUP_COMMIT.findall(log)
    if not found:
        return {"error": "the SQLite broker logged no transaction count"}
    writes, transactions, messages, acks = (int(n) for n in found[-1])
    return {"writes": writes, "transactions": transactions, "messages": messages,
            "acks": acks, "messages_per_transaction": round(messages / max(transactions, 1), 2)}


async def _profiled(cfg: Config, workdir: Path, target: Proc, load_args: list[str],
                    name: str) -> dict[str, Any]:
    load = common.role(f"load-{name}", "load", load_args, workdir)
    try:
        await asyncio.sleep(1.0)
        prof = await asyncio.to_thread(profile_pid, target.pid, cfg.profile_s,
                                       workdir / f"{name}.txt")
        out = await asyncio.to_thread(load.result, cfg.profile_s + 60)
        prof["load_while_profiled"] = {k: out[k] for k in ("throughput_rps", "p50_ms", "p99_ms")}
        return prof
    finally:
        load.kill()


def _redis() -> Any:
    from tests.redis_server import RedisServer

    return RedisServer(appendonly=True).start()


# -- 3: StreamStatus fan-out ---------------------------------------------------------

#: Fan-out measures event delivery, not reconnect policy: drops redialled within 50 ms,
#: and no attempt budget to space out its 20 drops in a few seconds.
FAST = ("--backoff-initial", "0.05", "--backoff-max", "0.2", "--redial-max", "0.05",
        "--attempt-burst", "0")


async def fanout(cfg: Config, workdir: Path) -> dict[str, Any]:
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "fan-sim", workdir)
    procs = [sim]
    try:
        brk, addr = await _broker("broker-fanout", workdir, upstream, extra=FAST)
        procs.append(brk)
        await common.pair_sessions(addr, ctl, ["fan-1"])
        client = await _subscribers("fanout-client", addr, cfg, workdir)
        procs.append(client)

        async def changes() -> None:
            for _ in range(cfg.fanout_changes):
                await asyncio.sleep(0.3)
                await acontrol(ctl, "drop", login="fan-1")
                await asyncio.sleep(0.1)
                await _wait_open(addr, "fan-1", 20)
            await asyncio.sleep(0.3)

        profile: dict[str, Any] | None = None
        if cfg.profile:  # a first round of changes under py-spy, then forgotten
            seconds = max(2.0, 0.6 * cfg.fanout_changes)
            profiling = asyncio.ensure_future(asyncio.to_thread(
                profile_pid, brk.pid, seconds, workdir / "profile-fanout.txt"))
            await changes()
            profile = await profiling
            client.send_line("reset")
            await asyncio.to_thread(client.wait_pattern, re.compile("^RESET$", re.M), 30)
        cpu0 = brk.cpu_seconds(), client.cpu_seconds()
        await changes()
        cpu1 = brk.cpu_seconds(), client.cpu_seconds()
        client.send_line("done")
        out = await asyncio.to_thread(client.result, 60)
        # What one delivery costs each side: the broker's grpc.aio write and the
        # subscriber's receive run on the same 2 cores, so one event reaches all N
        # subscribers no sooner than N times the larger of the two.
        broker_us, client_us, out["cpu_bound_ms_per_event"] = _cpu_cost(cfg, cpu0, cpu1, out)
        out["broker_cpu_us_per_delivery"] = broker_us
        out["subscriber_cpu_us_per_delivery"] = client_us
        out["broker_rss_mb"] = round(brk.rss_bytes() / 2**20, 1)
        brk.stop()
        client.stop()
        floor = await _fanout_floor(cfg, workdir, out.pop("bursts", None) or [])
        out["floor_per_delivery"] = floor["per_delivery"]
        out["floor_time_to_all"] = floor["time_to_all"]
        out["floor_events"] = floor["events"]
        out["floor_cpu_bound_ms_per_event"] = floor["cpu_bound_ms_per_event"]
        out["floor_server_cpu_us_per_delivery"] = floor["server_cpu_us_per_delivery"]
        for key in ("per_delivery_first_of_burst", "per_delivery_follow_up",
                    "gap_before_follow_up"):
            if key in floor:
                out[f"floor_{key}"] = floor[key]
        ratio = out["per_delivery"]["p99_ms"] / max(floor["per_delivery"]["p99_ms"], 1e-9)
        out["p99_vs_floor"] = f"{ratio:.2f}x"
        if profile is not None:
            out["profile"] = profile
        return out
    finally:
        for p in procs:
            p.stop()


async def _subscribers(name: str, addr: str, cfg: Config, workdir: Path) -> Proc:
    """The fan-out load client, once all its StreamStatus subscribers have their snapshot."""
    client = common.role(name, "load", ["fanout", "--target", addr, "--session", "fan-1",
                                        "--subscribers", str(cfg.fanout_subscribers)],
                         workdir, stdin=True)
    await asyncio.to_thread(client.ready, 90)
    return client


def _cpu_cost(
    cfg: Config, cpu0: tuple[float, float], cpu1: tuple[float, float], out: dict[str, Any]
) -> tuple[float, float, float]:
    """CPU microseconds per delivery of the server and of the subscribers' process,
    and the milliseconds per event the larger of the two implies for N subscribers."""
    deliveries = max(1, out["per_delivery"]["n"])
    server_us = (cpu1[0] - cpu0[0]) / deliveries * 1e6
    client_us = (cpu1[1] - cpu0[1]) / deliveries * 1e6
    bound_ms = cfg.fanout_subscribers * max(server_us, client_us) / 1000
    return round(server_us, 1), round(client_us, 1), round(bound_ms, 1)


async def _fanout_floor(
    cfg: Config, workdir: Path, bursts: list[list[float]]
) -> dict[str, Any]:
    """The same subscribers on a plain grpc.aio server, fed the broker's events per
    change at the same offsets the broker's were (`bursts`, as its subscribers saw
    them); the server times each burst itself. Without them (the broker's run saw
    none): three events 25 ms apart."""
    server = common.role("fanout-floor", "servers", ["fanout-floor"], workdir)
    client: Proc | None = None
    try:
        addr = (await asyncio.to_thread(server.ready))["address"]
        client = await _subscribers("fanout-floor-client", addr, cfg, workdir)
        bursts = bursts or [[0.0, 0.025, 0.05]]
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = _stub(channel)

            cpu0 = server.cpu_seconds(), client.cpu_seconds()
            for n in range(cfg.fanout_changes):
                await asyncio.sleep(0.3)
                burst = bursts[n % len(bursts)]
                schedule = ",".join(str(o) for o in burst)
                await stub.RestartSession(pb.SessionRef(session_id=f"fan-1@{schedule}"),
                                          timeout=10)
                await asyncio.sleep(burst[-1] + 0.1)
            await asyncio.sleep(0.3)
            cpu1 = server.cpu_seconds(), client.cpu_seconds()
        client.send_line("done")
        out = await asyncio.to_thread(client.result, 60)
        out["server_cpu_us_per_delivery"], _, out["cpu_bound_ms_per_event"] = _cpu_cost(
            cfg, cpu0, cpu1, out)
        return out
    finally:
        if client is not None:
            client.stop()
        server.stop()


# -- 4: many idle sessions -------------------------------------------------------------

async def idle(cfg: Config, workdir: Path) -> dict[str, Any]:
    from broker.simulator import Simulator, SimulatorConfig

    common.raise_nofile()
    sim = Simulator(SimulatorConfig(idle_timeout_s=cfg.idle_keepalive_s * 3,
                                    qr_interval_s=300.0, qr_max=5))
    await sim.start("127.0.0.1", 0)
    n = cfg.idle_sessions
    brk: Proc | None = None
    try:
        brk, addr = await _broker(
            "broker-idle", workdir, sim.url,
            extra=("--keepalive-interval", str(cfg.idle_keepalive_s), "--log-level", "warning"))
        await asyncio.sleep(cfg.idle_settle_s)
        rss0 = brk.rss_bytes()
        started = time.monotonic()

        ids = [f"idle-{i:05d}" for i in range(n)]
        await _pair_in_process(sim, addr, ids, timeout=max(120.0, n / 40))
        setup_s = time.monotonic() - started
        await asyncio.sleep(cfg.idle_settle_s)
        rss1 = brk.rss_bytes()
        pings0 = sum(sim.record(s).pings for s in ids)
        cpu0, t0 = brk.cpu_seconds(), time.monotonic()
        await asyncio.sleep(cfg.idle_window_s)
        cpu1, t1 = brk.cpu_seconds(), time.monotonic()
        pings1 = sum(sim.record(s).pings for s in ids)
        share = (cpu1 - cpu0) / (t1 - t0)
        extra: dict[str, Any] = {}
        if cfg.profile:  # after the measured window: py-spy takes CPU on these 2 cores
            extra["profile"] = await asyncio.to_thread(
                profile_pid, brk.pid, min(30.0, cfg.idle_window_s), workdir / "profile-idle.txt")
        return {**extra,
            "sessions": n, "keepalive_interval_s": cfg.idle_keepalive_s,
            "setup_s": round(setup_s, 1), "rss_before_mb": round(rss0 / 2**20, 1),
            "rss_after_mb": round(rss1 / 2**20, 1),
            "rss_per_session_kb": round((rss1 - rss0) / n / 1024, 2),
            "idle_window_s": round(t1 - t0, 1), "cpu_seconds": round(cpu1 - cpu0, 3),
            "cpu_share_of_core": round(share, 4),
            "keepalives_in_window": pings1 - pings0,
        }
    finally:
        if brk is not None:
            brk.stop()
        await sim.stop()


async def _pair_in_process(sim: Any, address: str, ids: Sequence[str], timeout: float) -> None:
    """Create every session, scan each QR as soon as it shows (the simulator runs in
    this process: no HTTP per scan), then wait for all OPEN with a few listings."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = _stub(channel)
        gate = asyncio.Semaphore(64)
        pending = set(ids)

        async def create(sid: str) -> None:
            async with gate:
                await stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=60)

        async def scanner() -> None:
            while pending and time.monotonic() < deadline:
                for sid in list(pending):
                    if await sim.scan(sid):
                        pending.discard(sid)
                await asyncio.sleep(0.2)

        scanning = asyncio.create_task(scanner())
        await asyncio.gather(*(create(s) for s in ids))
        await scanning
        while time.monotonic() < deadline:
            listing = await stub.ListSessions(pb.ListSessionsRequest(), timeout=120)
            not_open = [s.session_id for s in listing.sessions if s.state != pb.OPEN]
            if not not_open and len(listing.sessions) >= len(ids):
                return
            await asyncio.sleep(2.0)
        raise RuntimeError(f"{len(pending)} never scanned, {len(not_open)} not OPEN in time")


# -- 5: reconnect after a transient drop; delivery under the 1-5 s drop schedule ---------

class Watch:
    """A StreamStatus subscription in the driver, keeping every live event it sees."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.events: list[tuple[float, pb.StatusEvent]] = []
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = _stub(channel).StreamStatus(pb.StreamStatusRequest())
            async for event in call:
                if event.snapshot:
                    self.ready.set()
                    continue
                self.events.append((time.time(), event))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ready.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._task

    def first(self, session_id: str, state: int, after: float) -> tuple[float, float] | None:
        """(arrival, at) of the first `state` event of the session with `at` > after."""
        for arrival, event in self.events:
            at = event.at.ToNanoseconds() / 1e9
            if event.session_id == session_id and event.state == state and at > after:
                return arrival, at
        return None


async def reconnect(cfg: Config, workdir: Path) -> dict[str, Any]:
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "rc-sim", workdir)
    procs = [sim]
    watch: Watch | None = None
    try:
        brk, addr = await _broker("broker-reconnect", workdir, upstream)
        procs.append(brk)
        ids = [f"rc-{i:04d}" for i in range(cfg.reconnect_sessions)]
        await common.pair_sessions(addr, ctl, ids, timeout=120)
        watch = Watch(addr)
        await watch.start()
        dropped: dict[str, float] = {}
        for sid in ids:
            dropped[sid] = time.time()
            await acontrol(ctl, "drop", login=sid)
            await asyncio.sleep(cfg.reconnect_gap_s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(watch.first(s, pb.OPEN, t) for s, t in dropped.items()):
                break
            await asyncio.sleep(0.1)
        total, observed, missing = [], [], 0
        for sid, t0 in dropped.items():
            opened = watch.first(sid, pb.OPEN, t0)
            closed = watch.first(sid, pb.RECONNECTING, t0)
            if opened is None:
                missing += 1
                continue
            total.append(opened[1] - t0)
            if closed is not None:
                observed.append(opened[1] - closed[1])
        return {"drops": len(dropped), "not_reopened": missing,
                "drop_to_open": summary_ms(total), "close_seen_to_open": summary_ms(observed),
                "redial_max_s": LifecyclePolicy().redial_max_s}
    finally:
        if watch is not None:
            await watch.stop()
        for p in procs:
            p.stop()


def _as_user_saw(watch: Watch, session_id: str, t_start: float,
                 t_end: float) -> dict[str, Any]:
    """The session's StreamStatus over [t_start, t_end] (event `at`): the fraction of
    time OPEN, every gap from leaving OPEN to OPEN again that began in it, the retry
    delays it announced. The session is OPEN at t_start (paired, idle)."""
    events = sorted(((e.at.ToNanoseconds() / 1e9, e) for _, e in watch.events
                     if e.session_id == session_id), key=lambda item: item[0])
    open_since: float | None = t_start
    left: float | None = None
    open_s, gaps, retry_ms, held = 0.0, [], [], 0
    for at, event in events:
        if at < t_start:
            continue
        if at > t_end and left is None:
            break
        if event.state == pb.OPEN and event.previous_state != pb.OPEN:
            if left is not None:
                gaps.append(at - left)
                left = None
            open_since = at if at <= t_end else None
        elif event.previous_state == pb.OPEN and event.state != pb.OPEN and at <= t_end:
            if open_since is not None:
                open_s += at - open_since
                open_since = None
            left = at
        if event.state == pb.RECONNECTING and at <= t_end:
            retry_ms.append(event.retry_in_ms)
            held += SPACED_OUT in event.reason
    if open_since is not None:
        open_s += t_end - open_since
    return {"availability": round(open_s / (t_end - t_start), 4),
            "reconnect_gap": summary_ms(gaps), "announced_retry_ms_max": max(retry_ms, default=0),
            "attempts_held_back": held}


async def flapping(cfg: Config, workdir: Path) -> dict[str, Any]:
    """The original failure: the upstream drops every connection every 1-5 s for
    `flap_s`. A broker session with its default policy and a worker sending through
    it, next to the ideal reference in the same run and under the same drops: a bare
    client of the simulator that reconnects at once and resends, with the same sends."""
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "flap-sim", workdir)
    procs = [sim]
    watch: Watch | None = None
    pattern = ["--concurrency", "4", "--interval", "0.05", "--duration", str(cfg.flap_s),
               "--drain", str(cfg.flap_drain_s)]
    try:
        brk, addr = await _broker("broker-flap", workdir, upstream)
        procs.append(brk)
        await common.pair_sessions(addr, ctl, ["flap-1"])
        ideal = common.role("ideal-flap", "load", [
            "ideal", "--upstream-url", upstream, "--control-url", ctl, "--session",
            "flap-ideal", "--prefix", "ideal", *pattern], workdir, stdin=True)
        procs.append(ideal)
        client = common.role("load-flap", "load", [
            "reliable", "--target", addr, "--session", "flap-1", "--timeout", "10",
            "--prefix", "flap", "--wait-go", *pattern], workdir, stdin=True)
        procs.append(client)
        await _ready_all([ideal, client])
        watch = Watch(addr)
        await watch.start()
        before = await acontrol(ctl, "record", login="flap-1")
        ideal_before = await acontrol(ctl, "record", login="flap-ideal")
        await acontrol(ctl, "faults", drop_min_s=1, drop_max_s=5)
        t_start = time.time()
        client.send_line("go")
        ideal.send_line("go")
        await asyncio.sleep(cfg.flap_s)
        await acontrol(ctl, "faults")  # the schedule ends with the sending phase
        t_end = time.time()
        during = await acontrol(ctl, "record", login="flap-1")
        ideal_during = await acontrol(ctl, "record", login="flap-ideal")
        out = await asyncio.to_thread(client.result, cfg.flap_drain_s + 60)
        ref = await asyncio.to_thread(ideal.result, cfg.flap_drain_s + 60)
        await asyncio.sleep(1.0)  # the last reconnect's OPEN reaches the watch
        record = await acontrol(ctl, "record", login="flap-1")
        async with grpc.aio.insecure_channel(addr) as channel:
            health = await _stub(channel).Health(pb.HealthRequest(session_ids=["flap-1"]),
                                                 timeout=10)
        bodies = collections.Counter(m["body"] for m in record["accepted"])
        ids = collections.Counter(m["id"] for m in record["accepted"])
        sent = out["sent"]
        delivered = sum(1 for b in sent if bodies[b] >= 1)
        minutes = (t_end - t_start) / 60
        attempts = during["connection_attempts"] - before["connection_attempts"]
        ideal_attempts = ideal_during["connection_attempts"] - ideal_before["connection_attempts"]
        burst, rate = LifecyclePolicy().attempt_burst, LifecyclePolicy().attempt_rate_per_min
        counters = health.sessions[0].counters if health.sessions else pb.Counters()
        broker_side = {
            **_as_user_saw(watch, "flap-1", t_start, t_end),
            "drops": during["drops"] - before["drops"],
            "connection_attempts": attempts,
            "attempts_per_minute": round(attempts / minutes, 1),
            "attempt_bound": f"{burst} + {rate:g}/min x {minutes:.2f} min = "
                             f"{burst + rate * minutes:.0f}",
            "within_attempt_bound": attempts <= burst + rate * minutes,
            "ack_latency": out["ack_latency"],
            "health": {"availability_last_hour": round(counters.availability_last_hour, 4),
                       "reconnect_gap_ms_p99": round(counters.reconnect_gap_ms_p99, 1),
                       "attempts_per_minute": round(counters.attempts_per_minute, 1),
                       "recommendations": [r.code for r in health.sessions[0].recommendations]
                       if health.sessions else []},
        }
        ideal_side = {
            "availability": ref["availability"], "reconnect_gap": ref["reconnect_gap"],
            "drops": ideal_during["drops"] - ideal_before["drops"],
            "connection_attempts": ideal_attempts,
            "attempts_per_minute": round(ideal_attempts / minutes, 1),
            "ack_latency": ref["ack_latency"], "sent": ref["sent"], "acked": ref["acked"],
        }
        return {
            "sent": len(sent), "acked_to_client": len(out["acked"]),
            "delivered_upstream": delivered,
            "delivery_rate": round(delivered / len(sent), 6) if sent else float("nan"),
            "duplicate_deliveries": sum(c - 1 for c in bodies.values() if c > 1)
            + sum(c - 1 for c in ids.values() if c > 1),
            "upstream_deduplicated_resends": record["duplicates"],
            "send_attempts": out["attempts"], "client_errors": out["errors"],
            "elapsed_s": out["elapsed_s"], "schedule_s": cfg.flap_s,
            "broker": broker_side, "ideal": ideal_side,
        }
    finally:
        if watch is not None:
            await watch.stop()
        for p in procs:
            p.stop()


# -- 6: failover on Redis ----------------------------------------------------------------

async def _owners(address: str) -> dict[str, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = await _stub(channel).Health(pb.HealthRequest(), timeout=10)
    return {h.session.session_id: h.owner for h in health.sessions
            if h.session.state == pb.OPEN and h.live_state == pb.OPEN}


async def failover(cfg: Config, workdir: Path) -> dict[str, Any]:
    redis = _redis()
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "fo-sim", workdir)
    env = common.credential_env()
    ttl = cfg.failover_ttl_s
    extra = ("--lease-ttl", str(ttl))
    brokers: dict[str, tuple[Proc, str]] = {}
    procs = [sim]
    rounds: list[dict[str, Any]] = []
    try:
        for name in ("fo-b1", "fo-b2"):
            brokers[name] = await _broker(name, workdir, upstream, store=redis.url,
                                          env=env, extra=extra)
            procs.append(brokers[name][0])
        ids = [f"fo-{i}" for i in range(cfg.failover_sessions)]
        await common.pair_sessions(brokers["fo-b1"][1], ctl, ids, timeout=60)
        spawned = 2
        for _ in range(cfg.failover_rounds):
            owners: dict[str, str] = {}
            previous: dict[str, str] = {}
            deadline = time.monotonic() + 3 * ttl + 20
            while time.monotonic() < deadline:
                # Every session OPEN, each broker owning some, and the same answer
                # twice in a row a claim round apart: no handover in flight.
                owners = await _owners(next(iter(brokers.values()))[1])
                if (owners == previous and len(owners) == len(ids)
                        and set(owners.values()) == set(brokers)):
                    break
                previous = owners
                await asyncio.sleep(max(0.5, ttl / 5))
            counts = collections.Counter(owners.values())
            victim = max(brokers, key=lambda b: counts.get(b, 0))
            survivor = next(b for b in brokers if b != victim)
            moved = [s for s, o in owners.items() if o == victim]
            watch = Watch(brokers[survivor][1])
            await watch.start()
            t0 = time.time()
            brokers[victim][0].kill(signal.SIGKILL)
            del brokers[victim]
            wait_until = time.monotonic() + 3 * ttl + 15
            while time.monotonic() < wait_until:
                if all(watch.first(s, pb.OPEN, t0) for s in moved):
                    break
                await asyncio.sleep(0.05)
            await watch.stop()
            times = [hit[0] - t0 for s in moved if (hit := watch.first(s, pb.OPEN, t0))]
            rounds.append({"sessions_moved": len(moved), "reopened": len(times),
                           "kill_to_open_s": [round(t, 3) for t in times]})
            print(f"  failover round: {len(moved)} sessions moved, kill->OPEN "
                  f"{[round(t, 2) for t in times]} s (lease TTL {ttl} s)", flush=True)
            spawned += 1
            name = f"fo-b{spawned}"
            brokers[name] = await _broker(name, workdir, upstream, store=redis.url, env=env,
                                          extra=extra)
            procs.append(brokers[name][0])
        every = [t for r in rounds for t in r["kill_to_open_s"]]
        moved_total = sum(r["sessions_moved"] for r in rounds)
        return {"lease_ttl_s": ttl, "rounds": rounds, "sessions_moved": moved_total,
                "not_reopened": moved_total - len(every),
                "kill_to_open": summary_ms(every)}
    finally:
        for p in procs:
            p.stop()
        redis.close()


SCENARIOS: dict[str, Callable[[Config, Path], Awaitable[dict[str, Any]]]] = {
    "send": send,
    "fanout": fanout,
    "idle": idle,
    "reconnect": reconnect,
    "flapping": flapping,
    "failover": failover,
    "scale": scale,
}
