"""Many sessions and fairness (issue 13): aggregate Send throughput over 100 and
1,000 sessions against one session at the same total in flight, and the p99 of a
lightly used session while a neighbour floods, against its p99 alone.

Every process is separate: the simulator, one memory-store broker, the load clients.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from broker.config import Settings
from scripts.bench import common, scenarios
from scripts.bench.common import Proc
from scripts.bench.scenarios import Config, _broker, _load, _profiled


def _point(cfg: Config, role: str, addr: str, session: str, concurrency: int, prefix: str,
           sessions: int = 1, *, warmup: float | None = None,
           duration: float | None = None) -> list[str]:
    """Load-client arguments: the preset's warm-up and duration unless given."""
    return [role, "--target", addr, "--session", session, "--sessions", str(sessions),
            "--concurrency", str(concurrency),
            "--warmup", str(cfg.warmup_s if warmup is None else warmup),
            "--duration", str(cfg.duration_s if duration is None else duration),
            "--prefix", prefix]


async def sessions(cfg: Config, workdir: Path) -> dict[str, Any]:
    """For each (N sessions, total in flight C): unary Send and SendStream spread over
    N sessions, next to one session at the same C, interleaved, best of the reps."""
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "many-sim", workdir,
                                                 idle_timeout=120.0)
    procs: list[Proc] = [sim]
    try:
        brk, addr = await _broker("broker-many", workdir, upstream,
                                  extra=("--log-level", "warning"))
        procs.append(brk)
        top = max(cfg.many_sessions)
        await common.pair_sessions(addr, ctl, ["one"] + [f"many-{i}" for i in range(top)],
                                   timeout=max(120.0, top / 5))
        out: dict[str, Any] = {}
        for n, c in zip(cfg.many_sessions, cfg.many_in_flight, strict=True):
            runs: dict[str, list[dict[str, Any]]] = {}
            for rep in range(cfg.reps):
                for name, role, session, spread in (
                        ("one_session", "send", "one", 1), ("many_sessions", "send", "many", n),
                        ("one_session_stream", "stream", "one", 1),
                        ("many_sessions_stream", "stream", "many", n),
                        # the same spread straight to the simulator, no broker: what N
                        # websockets allow against one on this machine
                        ("one_session_floor", "ws", f"floor{n}r{rep}", 1),
                        ("many_sessions_floor", "ws", f"floor{n}r{rep}", n)):
                    args = _point(cfg, role, addr, session, c, f"m{n}r{rep}{name}", spread)
                    if role == "ws":
                        args += ["--upstream-url", upstream, "--control-url", ctl]
                    res = await _load(f"load-many-{n}-{name}-{rep}", workdir, args,
                                      cfg.warmup_s + cfg.duration_s + 120)
                    runs.setdefault(name, []).append(res)
                    print(f"  sessions={n:<5d} c={c:<5d} {name:22s} "
                          f"{res['throughput_rps']:8.1f} rps  p99 {res['p99_ms']:8.2f} ms  "
                          f"errors {res['errors']}", flush=True)
            best = {k: max(v, key=lambda r: r["throughput_rps"]) for k, v in runs.items()}
            for kind in ("", "_stream", "_floor"):
                one, many = best[f"one_session{kind}"], best[f"many_sessions{kind}"]
                best[f"aggregate_vs_one{kind}"] = round(
                    many["throughput_rps"] / max(one["throughput_rps"], 1e-9), 3)
            out[str(n)] = {"sessions": n, "in_flight": c, **best}
        if cfg.profile:  # where the time goes, spread against one session (SendStream)
            n, c = cfg.many_sessions[0], cfg.many_in_flight[0]
            secs = cfg.profile_s + 1
            out["profiles"] = {
                f"{n} sessions, SendStream c={c}": await _profiled(
                    cfg, workdir, brk, _point(cfg, "stream", addr, "many", c, "pm", n,
                                              warmup=0.5, duration=secs),
                    "profile-many-sessions"),
                f"one session, SendStream c={c}": await _profiled(
                    cfg, workdir, brk, _point(cfg, "stream", addr, "one", c, "po",
                                              warmup=0.5, duration=secs),
                    "profile-one-session"),
            }
        return out
    finally:
        for p in procs:
            p.stop()


async def _light_and_flood(cfg: Config, workdir: Path, tag: str, light: list[str],
                           flood_args: list[str], *, fresh_logins: bool = False
                           ) -> dict[str, Any]:
    """The light load alone, then while the flood runs, `cfg.reps` times interleaved:
    the best p99 of each, the best flood and their ratio. `fresh_logins`: each run
    logs in under a name of its own (the floors, which pair their own websockets)."""
    light_s = cfg.warmup_s + cfg.duration_s
    alone: list[dict[str, Any]] = []
    flooded: list[dict[str, Any]] = []
    floods: list[dict[str, Any]] = []

    def prefixed(args: list[str], prefix: str) -> list[str]:
        out = list(args)
        out[out.index("--prefix") + 1] = prefix
        if fresh_logins:
            out[out.index("--session") + 1] += f"-{prefix}"
        return out

    for rep in range(cfg.reps):
        alone.append(await _load(f"load-{tag}light-alone-{rep}", workdir,
                                 prefixed(light, f"{tag}la{rep}"), light_s + 60))
        args = prefixed(flood_args, f"{tag}f{rep}")
        args[args.index("--warmup") + 1] = str(cfg.warmup_s / 2)
        args[args.index("--duration") + 1] = str(cfg.duration_s + cfg.warmup_s)
        flood = common.role(f"load-{tag}flood-{rep}", "load", args, workdir)
        try:
            await asyncio.sleep(cfg.warmup_s / 2)  # the flood is on before the light starts
            flooded.append(await _load(f"load-{tag}light-flooded-{rep}", workdir,
                                       prefixed(light, f"{tag}lf{rep}"), light_s + 60))
            floods.append(await asyncio.to_thread(flood.result, light_s + 60))
        finally:
            flood.kill()
        print(f"  fairness {tag or 'broker'} rep {rep}: light alone p99 "
              f"{alone[-1]['p99_ms']:.2f} ms, under flood p99 {flooded[-1]['p99_ms']:.2f} ms "
              f"(flood {floods[-1]['throughput_rps']:.0f} rps)", flush=True)
    best_alone = min(alone, key=lambda r: r["p99_ms"])
    best_flooded = min(flooded, key=lambda r: r["p99_ms"])
    return {"light_alone": best_alone, "light_under_flood": best_flooded,
            "flood": max(floods, key=lambda r: r["throughput_rps"]),
            "p99_ratio": round(best_flooded["p99_ms"] / max(best_alone["p99_ms"], 1e-9), 3)}


async def fairness(cfg: Config, workdir: Path) -> dict[str, Any]:
    """A light session (one unary Send at a time) alone, then while a neighbour session
    floods the same broker on SendStream; the p99s, interleaved, best of the reps.

    The same pair straight to the simulator (`floor`: one websocket sending one
    message at a time, another flooding with the broker's send window in flight, no
    broker) shows what this machine and the one simulator both logins share allow a
    light login while a neighbour floods.
    """
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "fair-sim", workdir)
    procs: list[Proc] = [sim]
    try:
        brk, addr = await _broker("broker-fair", workdir, upstream)
        procs.append(brk)
        await common.pair_sessions(addr, ctl, ["light", "flood"])
        out = await _light_and_flood(
            cfg, workdir, "", _point(cfg, "send", addr, "light", 1, "l"),
            _point(cfg, "stream", addr, "flood", cfg.fairness_flood, "f"))
        ws = ["--upstream-url", upstream, "--control-url", ctl]
        # The broker lets at most its send window of the flood reach the upstream at
        # once; the floor's flood puts as many in flight there, not more.
        upstream_flood = min(cfg.fairness_flood, Settings().send_window)
        out["floor"] = await _light_and_flood(
            cfg, workdir, "ws", _point(cfg, "ws", addr, "floor-light", 1, "l") + ws,
            _point(cfg, "ws", addr, "floor-flood", upstream_flood, "f") + ws,
            fresh_logins=True)
        out["floor"]["flood_in_flight"] = upstream_flood
        if cfg.profile:  # the broker while the neighbour floods
            out["profile"] = await _profiled(cfg, workdir, brk, _point(
                cfg, "stream", addr, "flood", cfg.fairness_flood, "pf", warmup=0.5,
                duration=cfg.profile_s + 1), "profile-fairness")
        return {**out, "flood_in_flight": cfg.fairness_flood}
    finally:
        for p in procs:
            p.stop()


SCENARIOS = dict(scenarios.SCENARIOS)
SCENARIOS = {k: v for k, v in [*list(SCENARIOS.items())[:1], ("sessions", sessions),
                               ("fairness", fairness), *list(SCENARIOS.items())[1:]]}
"""Every scenario, in run order (send first, then these two, then the rest)."""
