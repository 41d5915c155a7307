"""Targets and the docs/benchmarks.md rendering of docs/benchmarks.json."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

NOTES = Path(__file__).with_name("NOTES.md")
SCENARIO_KEYS = ("send", "sessions", "fairness", "fanout", "idle", "reconnect", "flapping",
                 "failover", "scale")


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any) -> float | None:
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: what, measured, goal, met (None when not measured)."""
    out: list[dict[str, Any]] = []

    def add(name: str, measured: float | None, goal: str, ok: bool | None, shown: str) -> None:
        out.append({"target": name, "measured": shown if measured is not None else "n/a",
                    "goal": goal, "met": ok if measured is not None else None})

    send = results.get("send") or {}
    # Listed even when not measured: the run-by-run table lines runs up by position.
    top = max((int(c) for c in (send.get("relay") or {})), default=64)
    c = str(top)
    relay_rps = _num(_get(send, "relay", c, "throughput_rps"))
    relay_p99 = _num(_get(send, "relay", c, "p99_ms"))
    for store, floor in (("memory", 0.9), ("redis", 0.7)):
        rps = _num(_get(send, store, c, "throughput_rps"))
        ratio = rps / relay_rps if rps is not None and relay_rps else None
        add(f"Send {store} c={c} throughput vs relay floor", ratio, f">= {floor}x",
            ratio is not None and ratio >= floor, f"{ratio:.2f}x" if ratio else "")
    p99 = _num(_get(send, "memory", c, "p99_ms"))
    ratio = p99 / relay_p99 if p99 is not None and relay_p99 else None
    add(f"Send memory c={c} p99 vs relay floor", ratio, "<= 1.2x",
        ratio is not None and ratio <= 1.2, f"{ratio:.2f}x" if ratio else "")
    p99 = _num(_get(results, "fanout", "per_delivery", "p99_ms"))
    n = _get(results, "fanout", "subscribers")
    fan_floor = _num(_get(results, "fanout", "floor_per_delivery", "p99_ms"))
    shown = f"{p99:.1f} ms" if p99 is not None else ""
    if p99 is not None and fan_floor is not None:
        shown += f" (plain grpc.aio floor: {fan_floor:.1f} ms)"
    add(f"StreamStatus fan-out to {n} subscribers p99", p99, "< 100 ms",
        p99 is not None and p99 < 100, shown)
    kb = _num(_get(results, "idle", "rss_per_session_kb"))
    n = _get(results, "idle", "sessions")
    add(f"{n} idle sessions: RSS per session", kb, "< 30 KB", kb is not None and kb < 30,
        f"{kb:.1f} KB" if kb is not None else "")
    share = _num(_get(results, "idle", "cpu_share_of_core"))
    add(f"{n} idle sessions: CPU for keep-alives (30 s)", share, "< 10% of a core",
        share is not None and share < 0.10, f"{share * 100:.2f}%" if share is not None else "")
    p99 = _num(_get(results, "reconnect", "drop_to_open", "p99_ms"))
    add("Reconnect after a transient drop p99", p99, "< 1 s", p99 is not None and p99 < 1000,
        f"{p99:.0f} ms" if p99 is not None else "")
    rate = _num(_get(results, "flapping", "delivery_rate"))
    dups = _num(_get(results, "flapping", "duplicate_deliveries"))
    add("Delivery under 1-5 s drops", rate, "100%, 0 duplicates",
        rate == 1.0 and dups == 0,
        f"{(rate or 0) * 100:.2f}%, {dups or 0:.0f} duplicates" if rate is not None else "")
    _flapping_targets(results.get("flapping") or {}, add)
    worst = _num(_get(results, "failover", "kill_to_open", "max_ms"))
    ttl = _num(_get(results, "failover", "lease_ttl_s"))
    missing = _num(_get(results, "failover", "not_reopened")) or 0
    if worst is not None and ttl is not None:
        add(f"Failover kill -> OPEN (worst), lease TTL {ttl:g} s", worst / 1000,
            f"< {ttl + 1:g} s", worst / 1000 < ttl + 1 and missing == 0,
            f"{worst / 1000:.2f} s" + (f", {missing:.0f} not reopened" if missing else ""))
    else:
        add("Failover kill -> OPEN", None, "< TTL + 1 s", None, "")
    sizes = _get(results, "scale", "sizes") or {}
    done = [int(n) for n, r in sizes.items() if "redis_commands_per_session_per_s" in r]
    cost = _num(_get(sizes, str(max(done)), "redis_commands_per_session_per_s")) if done else None
    add(f"Idle Redis commands per session per s ({max(done) if done else 0:,} sessions)",
        cost, "<= 0.1", cost is not None and cost <= 0.1,
        f"{cost:.4f}" if cost is not None else "")
    _issue13_targets(results, add)
    return out


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> tuple[float | None, str]:
    """Path a's rate over path b's: the median of their ratios within each repetition,
    and how it was made. A repetition runs every path back to back, so pairing
    within it cancels the machine's drift between repetitions, which taking each
    path's best repetition on its own does not (on a machine that drifted 40% in
    minutes, best-of-each read 1.26x and 1.48x for one commit). Runs stored before
    the repetitions were kept: the best repetitions' ratio."""
    x, y = _num(a.get("throughput_rps")), _num(b.get("throughput_rps"))
    best = x / y if x is not None and y else None
    reps_a, reps_b = a.get("reps_rps") or [], b.get("reps_rps") or []
    pairs = [ra / rb for ra, rb in zip(reps_a, reps_b, strict=False) if rb]
    if best is None or len(pairs) < 2 or len(reps_a) != len(reps_b):
        return best, f"{best:.2f}x" if best is not None else ""
    value = statistics.median(pairs)
    return value, (f"{value:.2f}x (median of {len(pairs)} reps: "
                   f"{', '.join(f'{p:.2f}' for p in pairs)}; best reps {best:.2f}x)")


def _issue13_targets(results: dict[str, Any], add: Any) -> None:
    """Against what users run today (the HTTP relay peers) and the floors, same run."""
    send = results.get("send") or {}
    top = max((int(c) for c in (send.get("aiohttp") or {})), default=64)
    c = str(top)

    def ratio(a: str, b: str, goal: float, name: str) -> None:
        value, shown = paired_ratio(_get(send, a, c) or {}, _get(send, b, c) or {})
        add(name, value, f">= {goal}x", value is not None and value >= goal, shown)

    ratio("memory_stream", "aiohttp", 2.0, f"SendStream memory c={c} vs aiohttp peer")
    ratio("memory_stream", "upstream_ws", 0.7, f"SendStream memory c={c} vs websocket floor")
    ratio("redis_stream", "aiohttp", 1.5, f"SendStream Redis c={c} vs aiohttp peer")
    ratio("client", "aiohttp", 1.5, f"client.send() x{c} callers (coalescing) vs aiohttp peer")
    ratio("memory", "grpc_echo", 0.95, f"unary Send memory c={c} vs grpc.aio echo floor")
    ratio("memory", "express", 1.0, f"unary Send memory c={c} vs Express peer")
    measured = sorted((k for k in (results.get("sessions") or {}) if k.isdigit()), key=int)
    for n in [*measured, "100", "1000"][:2] if measured else ("100", "1000"):
        point = _get(results, "sessions", n) or {}
        value = _num(point.get("aggregate_vs_one"))
        floor = _num(point.get("aggregate_vs_one_floor"))
        shown = f"{value:.2f}x" if value is not None else ""
        if value is not None and floor is not None:
            shown += f" (websocket floor: {floor:.2f}x)"
        add(f"{n} sessions, {point.get('in_flight', '?')} in flight: aggregate vs one session",
            value, ">= 0.9x", value is not None and value >= 0.9, shown)
    value = _num(_get(results, "fairness", "p99_ratio"))
    floor = _num(_get(results, "fairness", "floor", "p99_ratio"))
    shown = f"{value:.2f}x" if value is not None else ""
    if value is not None and floor is not None:
        shown += f" (websocket floor: {floor:.2f}x)"
    add("Fairness: light session p99 under a neighbour's flood vs alone", value, "<= 2x",
        value is not None and value <= 2.0, shown)


def _scale_table(scale: dict[str, Any]) -> list[str]:
    """One row per session count: placement, idle Redis cost, broker cost, failover."""
    lines = ["| sessions | brokers | engine | place all (s) | idle Redis cmd/s | per session/s "
             "| Redis CPU (core) | brokers CPU (core, sum) | broker RSS MB (max) "
             "| SIGKILL: moved | all owned again (s) |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, r in (scale.get("sizes") or {}).items():
        if "error" in r:
            lines.append(f"| {int(n):,} | | | `{r['error'][:120]}` | | | | | | | |")
            continue
        cpu = sum((r.get("broker_cpu_share_of_core") or {}).values())
        rss = max((r.get("broker_rss_mb") or {"": 0}).values())
        fo = r.get("failover") or {}
        lines.append(
            f"| {int(n):,} | {r.get('brokers')} | {r.get('engine')} | "
            f"{_f(r.get('place_all_open_s'))} | {_f(r.get('redis_commands_per_s'))} | "
            f"{_f(r.get('redis_commands_per_session_per_s'), 4)} | "
            f"{_f(r.get('redis_cpu_share_of_core'), 3)} | {_f(cpu, 3)} | {_f(rss)} | "
            f"{fo.get('sessions_moved', '')} | {_f(fo.get('kill_to_all_owned_s'), 2)} |")
    return [*lines, ""]


def _flapping_targets(flap: dict[str, Any], add: Any) -> None:
    """What a user feels under 1-5 s drops, each next to the ideal reference's number."""
    def ideal(*path: str) -> str:
        value = _num(_get(flap, "ideal", *path))
        if value is None:
            return ""
        return f" (ideal {value * 100:.1f}%)" if path == ("availability",) else \
            f" (ideal {value:.0f} ms)"

    share = _num(_get(flap, "broker", "availability"))
    add("1-5 s drops: share of time OPEN", share, ">= 90%", share is not None and share >= 0.9,
        f"{(share or 0) * 100:.1f}%{ideal('availability')}")
    gap = _num(_get(flap, "broker", "reconnect_gap", "p99_ms"))
    add("1-5 s drops: reconnect gap p99", gap, "< 1 s", gap is not None and gap < 1000,
        f"{gap or 0:.0f} ms{ideal('reconnect_gap', 'p99_ms')}")
    ack = _num(_get(flap, "broker", "ack_latency", "p99_ms"))
    add("1-5 s drops: Send ack latency p99", ack, "< 2 s", ack is not None and ack < 2000,
        f"{ack or 0:.0f} ms{ideal('ack_latency', 'p99_ms')}")
    n = _num(_get(flap, "broker", "connection_attempts"))
    within = _get(flap, "broker", "within_attempt_bound")
    rate, ideal_rate = (_get(flap, side, "attempts_per_minute") for side in ("broker", "ideal"))
    add("1-5 s drops: connection attempts within the storm bound", n, "<= 10 + 30/min",
        within is True, f"{n or 0:.0f} ({rate}/min; ideal {ideal_rate}/min)")


def _f(value: Any, digits: int = 1) -> str:
    number = _num(value)
    return "n/a" if number is None else f"{number:,.{digits}f}"


SEND_LABELS = {
    "grpc_echo": "gRPC floor (grpc.aio echo)",
    "upstream_ws": "upstream floor (websocket send+ack)",
    "relay": "architecture floor (minimal gRPC relay)",
    "aiohttp": "peer: HTTP relay, aiohttp (the seed's design)",
    "express": "peer: HTTP relay, Express + ws (the seed's design)",
    "memory": "broker Send, memory store",
    "sqlite": "broker Send, SQLite store (synchronous=FULL)",
    "redis": "broker Send, Redis store",
    "memory_stream": "broker SendStream, memory store",
    "memory_batch": "broker SendBatch (16 a call), memory store",
    "redis_stream": "broker SendStream, Redis store",
    "client": "BrokerClient.send(), coalescing (memory)",
    "client_unary": "BrokerClient.send(coalesce=False), unary (memory)",
}
"""The Send paths in the order shown; paths not listed here follow in the results' order."""


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def _send_table(send: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """Every path at every concurrency, with its throughput as a ratio of the peers'
    and of the relay floor's at the same concurrency, and its p99 as the relay's."""
    lines = ["| path | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) | "
             "/ aiohttp | / Express | / relay | p99 / relay | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    labels = labels or SEND_LABELS
    for target, label in labels.items():
        for c, point in sorted((send.get(target) or {}).items(), key=lambda kv: int(kv[0])):
            if not isinstance(point, dict):
                continue

            def base(peer: str, key: str, c: str = c) -> float | None:
                return _num(_get(send, peer, c, key))

            rps, p99 = _num(point.get("throughput_rps")), _num(point.get("p99_ms"))
            errors = point.get("errors") or {}
            lines.append(
                f"| {label} | {c} | {_f(rps)} | {_f(point.get('p50_ms'), 2)} | {_f(p99, 2)} | "
                f"{_ratio(rps, base('aiohttp', 'throughput_rps'))} | "
                f"{_ratio(rps, base('express', 'throughput_rps'))} | "
                f"{_ratio(rps, base('relay', 'throughput_rps'))} | "
                f"{_ratio(p99, base('relay', 'p99_ms'))} | "
                f"{', '.join(f'{k} {v}' for k, v in errors.items()) or '-'} |")
    return lines


def _cpu_table(send: dict[str, Any], labels: dict[str, str] | None = None) -> list[str]:
    """CPU per request of each process on a path, at its highest concurrency: on this
    machine every process shares two cores, so the sum bounds a path's throughput."""
    rows = []
    for target, label in (labels or SEND_LABELS).items():
        points = {int(c): p for c, p in (send.get(target) or {}).items() if isinstance(p, dict)}
        if not points:
            continue
        c = max(points)
        cpu = points[c].get("cpu_us_per_request") or {}
        if not cpu:
            continue
        total = sum(cpu.values())
        rows.append(f"| {label} | {c} | {_f(cpu.get('server'))} | {_f(cpu.get('sim'))} | "
                    f"{_f(cpu.get('load'))} | {_f(cpu.get('redis'))} | {_f(total)} | "
                    f"{_f(2e6 / total if total else None, 0)} |")
    if not rows:
        return []
    return ["| path | concurrency | server | simulator | load | redis-server | all | "
            "two cores / all (req/s) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]


def _sessions_table(data: dict[str, Any]) -> list[str]:
    lines = ["| sessions | in flight | path | one session (req/s, p99 ms) | "
             "spread over the sessions (req/s, p99 ms) | aggregate / one |",
             "| ---: | ---: | --- | --- | --- | ---: |"]
    for n, point in sorted(data.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0):
        if not isinstance(point, dict) or "sessions" not in point:
            continue
        for kind, label in (("", "unary Send"), ("_stream", "SendStream"),
                            ("_floor", "websocket floor (no broker)")):
            if f"one_session{kind}" not in point:
                continue  # a run from before the floor was measured
            one = point.get(f"one_session{kind}") or {}
            many = point.get(f"many_sessions{kind}") or {}
            lines.append(f"| {n} | {point.get('in_flight')} | {label} | "
                         f"{_f(one.get('throughput_rps'))}, {_f(one.get('p99_ms'))} | "
                         f"{_f(many.get('throughput_rps'))}, {_f(many.get('p99_ms'))} | "
                         f"{point.get(f'aggregate_vs_one{kind}', 'n/a')}x |")
    return lines


def _kv_table(title: str, data: dict[str, Any]) -> list[str]:
    lines = [f"**{title}**", "", "| metric | value |", "| --- | --- |"]
    for key, value in data.items():
        if key == "profile":
            continue  # rendered as its own table
        if isinstance(value, dict) and {"p50_ms", "p99_ms"} <= set(value):
            shown = (f"p50 {_f(value['p50_ms'])} ms, p99 {_f(value['p99_ms'])} ms, "
                     f"max {_f(value.get('max_ms'))} ms (n={value.get('n')})")
        elif isinstance(value, list | dict):
            shown = f"`{value}`"
        else:
            shown = str(value)
        lines.append(f"| {key} | {shown} |")
    return [*lines, ""]


def _flap_table(flap: dict[str, Any]) -> list[str]:
    """The broker next to the ideal reference (reconnects at once), same drops, same run."""
    lines = ["| what a user feels | broker | ideal reference |", "| --- | --- | --- |"]

    def cell(value: Any) -> str:
        if isinstance(value, dict) and {"p50_ms", "p99_ms"} <= set(value):
            return (f"p50 {_f(value['p50_ms'])} / p99 {_f(value['p99_ms'])} / max "
                    f"{_f(value.get('max_ms'))} ms (n={value.get('n')})")
        if isinstance(value, float) and 0 <= value <= 1:
            return f"{value * 100:.1f}%"
        return "n/a" if value is None else str(value)

    for key, label in (("availability", "share of time OPEN"),
                       ("reconnect_gap", "reconnect gap (left OPEN to OPEN)"),
                       ("ack_latency", "Send ack latency (Sends made during the run)"),
                       ("attempts_per_minute", "connection attempts per minute"),
                       ("connection_attempts", "connection attempts"),
                       ("drops", "drops"), ("attempt_bound", "storm bound (attempts)"),
                       ("announced_retry_ms_max", "longest announced retry_in_ms"),
                       ("attempts_held_back", "attempts held back by the budget")):
        lines.append(f"| {label} | {cell(_get(flap, 'broker', key))} | "
                     f"{cell(_get(flap, 'ideal', key)) if key in flap['ideal'] else '-'} |")
    return [*lines, ""]


def _profile_lines(name: str, prof: dict[str, Any]) -> list[str]:
    if "error" in prof:
        return [f"- {name}: {prof['error']}"]
    load = prof.get("load_while_profiled")
    during = (f"; load while profiled: {_f(load.get('throughput_rps'))} req/s, "
              f"p99 {_f(load.get('p99_ms'), 2)} ms" if load else "")
    threads = prof.get("thread_cpu_share") or {}
    cpu = (f"; CPU over those seconds: event loop {_f(threads.get('event loop'), 2)}, "
           f"gRPC's and other threads {_f(threads.get('other threads'), 2)} of a core"
           if threads else "")
    lines = [f"**{name}** ({prof.get('samples')} samples of the event loop's thread{during}"
             f"{cpu})", "",
             "| self % | function (leaf) | | inclusive % | function (this repo) |",
             "| ---: | --- | --- | ---: | --- |"]
    left, right = prof.get("top_self_pct") or [], prof.get("top_broker_inclusive_pct") or []
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ["", ""]
        b = right[i] if i < len(right) else ["", ""]
        lines.append(f"| {a[1]} | `{a[0]}` | | {b[1]} | `{b[0]}` |" if a[0] or b[0] else "")
    return [*lines, ""]


def _compare(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One column per full run, oldest first: what each round of fixes changed."""
    rows = [("Send memory c=64 req/s", ("send", "memory", "64", "throughput_rps")),
            ("Send memory c=64 p99 ms", ("send", "memory", "64", "p99_ms")),
            ("Send memory c=16 req/s", ("send", "memory", "16", "throughput_rps")),
            ("Send memory c=1 p50 ms", ("send", "memory", "1", "p50_ms")),
            ("Send SQLite c=64 req/s", ("send", "sqlite", "64", "throughput_rps")),
            ("Send Redis c=64 req/s", ("send", "redis", "64", "throughput_rps")),
            ("Send Redis c=64 p99 ms", ("send", "redis", "64", "p99_ms")),
            ("relay floor c=64 req/s (same run)", ("send", "relay", "64", "throughput_rps")),
            ("relay floor c=64 p99 ms (same run)", ("send", "relay", "64", "p99_ms")),
            ("fan-out p99 ms", ("fanout", "per_delivery", "p99_ms")),
            ("fan-out floor p99 ms (same run)", ("fanout", "floor_per_delivery", "p99_ms")),
            ("idle RSS KB/session", ("idle", "rss_per_session_kb")),
            ("idle CPU share of a core", ("idle", "cpu_share_of_core")),
            ("reconnect p99 ms", ("reconnect", "drop_to_open", "p99_ms")),
            ("1-5 s drops: OPEN share", ("flapping", "broker", "availability")),
            ("1-5 s drops: reconnect gap p99 ms", ("flapping", "broker", "reconnect_gap",
                                                   "p99_ms")),
            ("1-5 s drops: Send ack p99 ms", ("flapping", "broker", "ack_latency", "p99_ms")),
            ("failover worst ms", ("failover", "kill_to_open", "max_ms"))]
    names = [f"`{name}`" for name, _ in runs]
    results = [run.get("results", {}) for _, run in runs]
    head = ["| metric | " + " | ".join(names) + " |",
            "| --- |" + " ---: |" * len(runs)]
    lines = list(head)
    for label, path in rows:
        values = [_get(r, *path) for r in results]
        if all(v is None for v in values):
            continue
        digits = 4 if "share" in label else 1
        lines.append(f"| {label} | " + " | ".join(_f(v, digits) for v in values) + " |")
    # targets() lists the same targets in the same order for any results; a name
    # carries measured values (session counts, the TTL), so rows go by position
    # and take their name from the newest run that measured them.
    per_run = [targets(r) for r in results]
    lines += ["", "| target | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(runs)]
    for row in zip(*per_run, strict=True):
        name = next((t["target"] for t in reversed(row) if t["met"] is not None),
                    row[-1]["target"])
        cells = [f"{t['measured']} ({_met(t['met'])})" for t in row]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _met(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def render(doc: dict[str, Any], label: str) -> str:
    run = doc["runs"][label]
    res = run.get("results", {})
    lines = ["# Benchmarks", "",
             "Generated by `scripts/bench/run.py` (see the README's Benchmarks section); "
             "every ratio is against floors measured in the same run, on the same machine. "
             "Numbers from a shared, noisy 2-core machine: compare ratios, not absolutes.", "",
             f"- run: `{label}`, mode `{run.get('mode')}`, {run.get('date')}",
             f"- command: `{run.get('command')}`",
             f"- machine: {run.get('cores')} cores, {run.get('cpu')}, Python {run.get('python')}",
             "- processes: broker, simulator, floors and load clients each in their own "
             "process, over loopback", ""]
    if run.get("commands") and len(run["commands"]) > 1:
        dates = list(run.get("dates") or [])
        dates += [""] * (len(run["commands"]) - len(dates))
        lines += ["Scenarios re-run into this run (a re-run's rates compare only within its "
                  "own scenario: the machine's speed changes between runs): " +
                  "; ".join(f"`{c}`" + (f" ({d})" if d else "")
                            for c, d in zip(run["commands"][1:], dates[1:], strict=True)), ""]
    lines += ["## Targets", "", "| target | measured | goal | |", "| --- | --- | --- | --- |"]
    for t in targets(res):
        lines.append(f"| {t['target']} | {t['measured']} | {t['goal']} | {_met(t['met'])} |")
    lines.append("")
    if "send" in res:
        lines += ["## Send (waits for the upstream ack), one session", ""]
        if "error" in res["send"]:
            lines += [f"error: `{res['send']['error']}`", ""]
        lines += [*_send_table(res["send"]), ""]
        cpu = _cpu_table(res["send"])
        if cpu:
            lines += ["**CPU per request, by process (microseconds)**, over each path's "
                      "measured window at its highest concurrency (best repetition). Every "
                      "process of a path runs on the same two cores, so \"two cores / all\" "
                      "is the throughput the path could reach if the CPU were its only "
                      "limit; the broker's share is its column \"server\".", "",
                      *cpu, ""]
        commits = res["send"].get("sqlite_group_commit") or {}
        if commits.get("transactions"):
            lines += [f"SQLite group commit over the whole Send run: {commits['messages']} "
                      f"messages and {commits['acks']} acks in {commits['transactions']} "
                      f"transactions ({commits['messages_per_transaction']} messages per "
                      "transaction; each outbox write carries the Sends and acks its session "
                      f"gathered, and writes queued during a commit share the next one: "
                      f"{commits['writes']} writes in all).", ""]
    if isinstance(res.get("sessions"), dict) and "error" not in res["sessions"]:
        lines += ["## Many sessions: aggregate Send throughput against one session", "",
                  *_sessions_table(res["sessions"]), ""]
        for name, prof in (res["sessions"].get("profiles") or {}).items():
            lines += _profile_lines(f"py-spy profile of the broker: {name}", prof)
    fair = res.get("fairness")
    if isinstance(fair, dict) and "light_alone" in fair:
        lines += ["## Fairness: a light session while a neighbour floods", "",
                  "| light session (one Send at a time) | throughput (req/s) | p50 (ms) | "
                  "p99 (ms) |", "| --- | ---: | ---: | ---: |"]
        flood_rps = _f(_get(fair, "flood", "throughput_rps"))
        flooded = (f"while a neighbour floods on SendStream ({fair.get('flood_in_flight')} "
                   f"in flight, {flood_rps} req/s)")
        rows: list[tuple[dict[str, Any], str]] = [
            (fair["light_alone"], "broker: alone"),
            (fair["light_under_flood"], f"broker: {flooded}")]
        floor = fair.get("floor")
        if isinstance(floor, dict) and "light_alone" in floor:
            floor_rps = _f(_get(floor, "flood", "throughput_rps"))
            rows += [(floor["light_alone"], "websocket floor (no broker): alone"),
                     (floor["light_under_flood"], "websocket floor: while a neighbour login "
                      f"floods ({floor.get('flood_in_flight')} in flight, {floor_rps} msg/s)")]
        for point, what in rows:
            lines.append(f"| {what} | {_f(point.get('throughput_rps'))} | "
                         f"{_f(point.get('p50_ms'), 2)} | {_f(point.get('p99_ms'), 2)} |")
        lines += ["", f"p99 under the flood / alone: {fair.get('p99_ratio')}x"
                  + (f" (websocket floor: {floor.get('p99_ratio')}x)"
                     if isinstance(floor, dict) and "p99_ratio" in floor else ""), ""]
        if isinstance(fair.get("profile"), dict):
            lines += _profile_lines("py-spy profile of the broker during the flood",
                                    fair["profile"])
    titles = {"fanout": "StreamStatus fan-out (event `at` to arrival)",
              "idle": "Idle sessions with keep-alive",
              "reconnect": "Reconnect after a transient drop (428, default policy)",
              "flapping": "The upstream drops every 1-5 s: delivery, availability, waits "
                          "(broker next to the ideal reference)",
              "failover": "Failover on Redis (SIGKILL of the owner)",
              "scale": "Control-plane scale: idle sessions on several brokers, one Redis"}
    for key, title in titles.items():
        if key in res:
            lines += ["## " + title, ""]
            if key == "flapping" and isinstance(res[key].get("broker"), dict):
                lines += _flap_table(res[key])
            if key == "scale":
                lines += _scale_table(res[key])
                continue
            lines += _kv_table(key, res[key])
            if isinstance(res[key].get("profile"), dict):
                lines += _profile_lines(f"py-spy profile of the broker ({key})",
                                        res[key]["profile"])
    runs = doc["runs"]
    if len(runs) > 1:
        lines += ["## Run by run: before and after each round of profile-driven fixes", "",
                  *_compare(list(runs.items())), ""]
    shown = [n for n in ("before", "after") if n in runs]
    if label not in shown:
        shown.append(label)
    for name in shown:
        profs = _get(runs[name], "results", "send", "profiles")
        if profs:
            lines += [f"## Profile of the broker under Send c=64 (run `{name}`)", "",
                      "py-spy, sampling the broker process while a separate client sends.", ""]
            for store, prof in profs.items():
                lines += _profile_lines(f"{store} store", prof)
    if NOTES.exists():
        lines += ["## Notes", "", NOTES.read_text().strip(), ""]
    return "\n".join(line for line in lines) + "\n"
