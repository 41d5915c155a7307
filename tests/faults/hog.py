"""A broker process whose event loop can be kept busy on demand (tests only).

`python -m tests.faults.hog serve ...` runs `broker.cli` with two signal
handlers, which run on the main thread and so hold up its event loop while
the process's other threads go on (like a loop starting thousands of actors,
or one stuck in a long synchronous call):

- SIGUSR1: spin for HOG_BUSY_S seconds (busy, then free again);
- SIGUSR2: spin for HOG_WEDGE_S seconds (wedged).

Each writes "hog: <what> begins" / "hog: <what> ends" to stdout (the log).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from types import FrameType


def _spin(what: str, seconds: float) -> None:
    print(f"hog: {what} begins", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # holds the GIL but for the switch interval
        pass
    print(f"hog: {what} ends", flush=True)


def _busy(_sig: int, _frame: FrameType | None) -> None:
    _spin("busy", float(os.environ["HOG_BUSY_S"]))


def _wedge(_sig: int, _frame: FrameType | None) -> None:
    _spin("wedge", float(os.environ["HOG_WEDGE_S"]))


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _busy)
    signal.signal(signal.SIGUSR2, _wedge)
    sys.argv = ["broker", *sys.argv[1:]]
    runpy.run_module("broker.cli", run_name="__main__", alter_sys=True)
