"""Sample a running process with py-spy and summarise the hot frames.

`py-spy record --format raw` writes collapsed stacks ("outer;...;leaf count");
the summary is the share of samples in which a function is the leaf (self)
and in which it appears at all (inclusive), with the repository's own
functions listed apart so the broker's share is readable next to grpc's and
asyncio's.

Only the event loop's thread counts: py-spy samples gRPC's own threads as busy
while they wait inside gRPC's C code (under SendStream c=64 they were about a
quarter of all samples, yet /proc showed them using about 1% of a core). What
each thread really used comes from /proc over the same seconds
(`thread_cpu_share`).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scripts.bench.common import stat_cpu_seconds

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def _short(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found.group("file")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{found.group('func')} ({path})"


def summarise(collapsed: str, top: int = 15) -> dict[str, Any]:
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = everything = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        everything += count
        if not any(f.startswith("BaseEventLoop.run_forever ") for f in frames):
            continue  # another thread (see the module's docstring)
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
            if frame.endswith(".py)") and frame.split("(")[-1].startswith(("broker/", "clients/")):
                own[frame] += count

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)]

    return {"samples": total, "other_thread_samples": everything - total,
            "top_self_pct": share(self_counts),
            "top_inclusive_pct": share(incl), "top_broker_inclusive_pct": share(own)}


def profile_pid(pid: int, seconds: float, out: Path, rate: int = 200) -> dict[str, Any]:
    """Record `seconds` of the process; {} with a note when py-spy is missing."""
    exe = _py_spy()
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
           "--rate", str(rate), "--format", "raw", "--function", "--nonblocking",
           "--output", str(out)]
    before, started = _thread_cpu(pid), time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    after, elapsed = _thread_cpu(pid), time.monotonic() - started
    if done.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed ({done.returncode}): {done.stderr[-500:]}"}
    summary = summarise(out.read_text(errors="replace"))
    loop = after.pop(pid, 0.0) - before.pop(pid, 0.0)
    others = sum(used - before.get(tid, 0.0) for tid, used in after.items())
    summary["thread_cpu_share"] = {"event loop": round(loop / elapsed, 3),
                                   "other threads": round(others / elapsed, 3)}
    return summary


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid` (the main thread's id is the pid)."""
    used: dict[int, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            used[int(stat.parent.name)] = stat_cpu_seconds(stat)
        except OSError:
            continue  # the thread ended
    return used
