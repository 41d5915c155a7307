"""The bench's py-spy summary counts the event loop's thread only: gRPC's threads
are sampled as busy while they wait in C, and would dilute every share."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import profile  # noqa: E402

LOOP = ("process 1:\"python\";thread (0x1);<module> (broker/cli.py:28);"
        "BaseEventLoop.run_forever (asyncio/base_events.py:607);")
COLLAPSED = "\n".join([
    LOOP + "SessionManager.send (/work/main/broker/runtime/manager.py:399) 30",
    LOOP + "EpollSelector.select (selectors.py:468) 10",
    "process 1:\"python\";thread (0x2);Thread.run (threading.py:975) 60",
])


def test_only_the_event_loop_thread_is_counted() -> None:
    summary = profile.summarise(COLLAPSED)
    assert summary["samples"] == 40
    assert summary["other_thread_samples"] == 60
    assert summary["top_self_pct"][0] == ["SessionManager.send (broker/runtime/manager.py)", 75.0]
    assert all("Thread.run" not in name for name, _ in summary["top_inclusive_pct"])
    assert ["SessionManager.send (broker/runtime/manager.py)", 75.0] in \
        summary["top_broker_inclusive_pct"]


def test_thread_cpu_names_the_main_thread_by_the_pid() -> None:
    used = profile._thread_cpu(os.getpid())
    assert os.getpid() in used and all(v >= 0 for v in used.values())
