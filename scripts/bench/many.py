"""Many sessions and fairness (issue 13): aggregate Send throughput over 100 and
1,000 sessions against one session at the same total in flight, and the p99 of a
lightly used session while a neighbour floods, against its p99 alone.

Every process is separate: the simulator, one memory-store broker, the load clients.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

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


async def fairness(cfg: Config, workdir: Path) -> dict[str, Any]:
    """A light session (one unary Send at a time) alone, then while a neighbour session
    floods the same broker on SendStream; the p99s, interleaved, best of the reps."""
    sim, upstream, ctl = await asyncio.to_thread(common.simulator, "fair-sim", workdir)
    procs: list[Proc] = [sim]
    light_s = cfg.warmup_s + cfg.duration_s
    try:
        brk, addr = await _broker("broker-fair", workdir, upstream)
        procs.append(brk)
        await common.pair_sessions(addr, ctl, ["light", "flood"])
        alone: list[dict[str, Any]] = []
        flooded: list[dict[str, Any]] = []
        floods: list[dict[str, Any]] = []
        for rep in range(cfg.reps):
            alone.append(await _load(f"load-light-alone-{rep}", workdir,
                                     _point(cfg, "send", addr, "light", 1, f"la{rep}"),
                                     light_s + 60))
            flood_args = _point(cfg, "stream", addr, "flood", cfg.fairness_flood, f"f{rep}")
            flood_args[flood_args.index("--warmup") + 1] = str(cfg.warmup_s / 2)
            flood_args[flood_args.index("--duration") + 1] = str(cfg.duration_s + cfg.warmup_s)
            flood = common.role(f"load-flood-{rep}", "load", flood_args, workdir)
            try:
                await asyncio.sleep(cfg.warmup_s / 2)  # the flood is on before the light starts
                flooded.append(await _load(f"load-light-flooded-{rep}", workdir,
                                           _point(cfg, "send", addr, "light", 1, f"lf{rep}"),
                                           light_s + 60))
                floods.append(await asyncio.to_thread(flood.result, light_s + 60))
            finally:
                flood.kill()
            print(f"  fairness rep {rep}: light alone p99 {alone[-1]['p99_ms']:.2f} ms, "
                  f"under flood p99 {flooded[-1]['p99_ms']:.2f} ms (flood "
                  f"{floods[-1]['throughput_rps']:.0f} rps)", flush=True)
        profile: dict[str, Any] | None = None
        if cfg.profile:  # the broker while the neighbour floods
            profile = await _profiled(cfg, workdir, brk, _point(
                cfg, "stream", addr, "flood", cfg.fairness_flood, "pf", warmup=0.5,
                duration=cfg.profile_s + 1), "profile-fairness")
        best_alone = min(alone, key=lambda r: r["p99_ms"])
        best_flooded = min(flooded, key=lambda r: r["p99_ms"])
        return {"light_alone": best_alone, "light_under_flood": best_flooded,
                "flood": max(floods, key=lambda r: r["throughput_rps"]),
                "flood_in_flight": cfg.fairness_flood,
                **({"profile": profile} if profile is not None else {}),
                "p99_ratio": round(best_flooded["p99_ms"] / max(best_alone["p99_ms"], 1e-9), 3)}
    finally:
        for p in procs:
            p.stop()


SCENARIOS = dict(scenarios.SCENARIOS)
SCENARIOS = {k: v for k, v in [*list(SCENARIOS.items())[:1], ("sessions", sessions),
                               ("fairness", fairness), *list(SCENARIOS.items())[1:]]}
"""Every scenario, in run order (send first, then these two, then the rest)."""
