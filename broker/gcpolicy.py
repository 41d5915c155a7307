"""The broker process's garbage-collection policy.

Python collects its youngest generation every 700 net allocations and, every so
often, walks every tracked container. A broker under load allocates a few
objects per message (futures, tasks, protobufs, store rows), and its memory
store holds dicts with millions of entries; with the defaults the collector ran
hundreds of times a second and its full passes paused the event loop for every
session at once. Under a neighbour's flood that was most of a light session's
p99 (docs/benchmarks.md, "Issue 13, stop 16"). Collecting less often keeps
cycles for longer but bounded: the young generation still goes every
`young` allocations.
"""

from __future__ import annotations

import gc

OLDER = (50, 1000)
"""Young collections per middle one, middle per full (Python's: 10 and 10)."""


def thresholds(young: int) -> tuple[int, int, int] | None:
    """What `gc.set_threshold` gets; None: leave Python's defaults (young = 0)."""
    if young < 0:
        raise ValueError(f"--gc-threshold must be 0 or more, not {young}")
    return None if young == 0 else (young, *OLDER)


def apply(young: int) -> None:
    """Set the thresholds at start-up (before the service allocates its state)."""
    chosen = thresholds(young)
    if chosen is not None:
        gc.set_threshold(*chosen)


def settle(young: int) -> None:
    """Once started (young > 0): what start-up built lives as long as the process, so
    later full collections need not walk it (`gc.freeze`)."""
    if thresholds(young) is not None:
        gc.collect()
        gc.freeze()
