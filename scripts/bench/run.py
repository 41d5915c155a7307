"""Run the benchmarks and write docs/benchmarks.md and docs/benchmarks.json.

    .venv/bin/python scripts/bench/run.py                 # full, about 10 minutes
    .venv/bin/python scripts/bench/run.py --quick         # about 2-3 minutes
    .venv/bin/python scripts/bench/run.py --only send     # one scenario (repeatable)
    .venv/bin/python scripts/bench/run.py --smoke --out-dir /tmp/b   # seconds; for the test

Scenarios: send (with the floors and the HTTP relay peers), sessions (100 and
1,000 sessions), fairness, fanout, idle, reconnect, flapping, failover, scale
(`--scale-sizes`, `--scale-brokers`, `--scale-engine`). Results are stored
under a label (`--label`, default `latest`); a run with `--only` merges into
the label's earlier results. These are
benchmarks: they print numbers and never fail on a threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.bench import report  # noqa: E402
from scripts.bench.many import SCENARIOS  # noqa: E402
from scripts.bench.scenarios import PRESETS  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs, 1,000 idle sessions")
    mode.add_argument("--smoke", action="store_true", help="a few requests per scenario")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"run only this scenario ({', '.join(SCENARIOS)}); repeatable")
    parser.add_argument("--label", default="latest", help="store results under this label")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs",
                        help="where benchmarks.md and benchmarks.json go (default docs/)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--concurrency", action="append", type=int, default=[], metavar="N",
                        help="Send points at these concurrencies only (repeatable)")
    parser.add_argument("--scale-sizes", default="", metavar="N,N,...",
                        help="scale: the session counts to run (default by mode)")
    parser.add_argument("--scale-brokers", type=int, default=0, metavar="N",
                        help="scale: broker processes (default 4)")
    parser.add_argument("--scale-engine", choices=("null", "sim"), default="",
                        help="scale: null sessions (no sockets) or paired simulator sessions")
    parser.add_argument("--scale-ttl", type=float, default=0, metavar="S",
                        help="scale: the brokers' lease TTL (default: the failover TTL, 10 s)")
    parser.add_argument("--scale-redis", choices=("single", "cluster"), default="",
                        help="scale: one redis-server or a 3-primary Redis Cluster")
    args = parser.parse_args(argv)
    names = [n for item in args.only for n in item.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    args.only = names
    return args


async def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cfg = PRESETS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.no_profile:
        cfg = replace(cfg, profile=False)
    if args.concurrency:
        cfg = replace(cfg, concurrencies=tuple(args.concurrency))
    if args.scale_sizes:
        cfg = replace(cfg, scale_sizes=tuple(int(n) for n in args.scale_sizes.split(",")))
    if args.scale_brokers:
        cfg = replace(cfg, scale_brokers=args.scale_brokers)
    if args.scale_engine:
        cfg = replace(cfg, scale_engine=args.scale_engine)
    if args.scale_redis:
        cfg = replace(cfg, scale_redis=args.scale_redis)
    if args.scale_ttl:
        cfg = replace(cfg, scale_ttl_s=args.scale_ttl)
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            results[name] = await scenario(cfg, workdir)
        except Exception as exc:
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        results[name]["elapsed_s"] = round(time.monotonic() - started, 1)
        shown = {k: v for k, v in results[name].items() if k != "profiles"}
        print(f"   {json.dumps(shown)[:1500]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    workdir = Path(tempfile.mkdtemp(prefix="broker-bench-"))
    command = shlex.join([".venv/bin/python", "scripts/bench/run.py",
                          *(sys.argv[1:] if argv is None else argv)])
    print(f"benchmark run ({mode}); process logs in {workdir}", flush=True)
    started = time.monotonic()
    results = asyncio.run(run_all(args, workdir))
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "benchmarks.json", out_dir / "benchmarks.md"
    doc: dict[str, Any] = {"runs": {}}
    if json_path.exists():
        with contextlib.suppress(ValueError):
            doc = json.loads(json_path.read_text())
    doc.setdefault("runs", {})
    run = doc["runs"].get(args.label) if args.only else None
    if run is None or run.get("mode") != mode:
        run = {"commands": []}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    first = not run["commands"]
    run.update({
        "mode": mode, "command": command if first else run["command"],
        "date": now if first else run.get("date", now),  # the first run's; re-runs: "dates"
        "cores": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version(),
    })
    run["commands"].append(command)
    run.setdefault("dates", [])
    run["dates"] += [""] * (len(run["commands"]) - 1 - len(run["dates"])) + [now]
    run.setdefault("results", {}).update(results)
    run["targets"] = report.targets(run["results"])
    doc["runs"][args.label] = run
    doc["latest"] = args.label
    json_path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    md_path.write_text(report.render(doc, args.label))
    print(f"\nwrote {md_path} and {json_path} in {time.monotonic() - started:.0f} s")
    for t in run["targets"]:
        print(f"  {report._met(t['met']):>12s}  {t['target']}: {t['measured']} ({t['goal']})")
    failed = [n for n, r in results.items() if "error" in r]
    if args.smoke and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"scenarios with errors: {failed or 'none'}; process logs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
