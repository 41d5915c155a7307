"""The lifecycle machine's timers on the event loop.

A firing is not fed to the machine from the timer callback: it is posted to
the actor's inbox with a token, so it is handled in turn with everything else,
and a firing queued before a cancel or a re-arm is recognised as stale.

A timer allowed slack runs out on a grid of that step (`coalesced`): the
keep-alives of thousands of sessions then fire in a few wakes of the loop, and
their pongs come back in bursts, instead of one wake for each.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Protocol

from broker.lifecycle.actions import Timer


@dataclass(frozen=True, slots=True)
class TimerDue:
    """A timer ran out (posted to the inbox; `Timers.fired` says if it still counts)."""

    timer: Timer
    token: int


def coalesced(when: float, slack_s: float) -> float:
    """`when` rounded up to the next multiple of `slack_s` (unchanged for 0): every
    deadline in one step of the grid becomes the same, at most `slack_s` late."""
    if slack_s <= 0:
        return when
    return math.ceil(when / slack_s) * slack_s


class _Inbox(Protocol):
    def put_nowait(self, item: TimerDue, /) -> None: ...


class Timers:
    """At most one of each `Timer` armed, as the machine's StartTimer/CancelTimer say."""

    __slots__ = ("_armed", "_inbox", "_tokens")

    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox
        self._armed: dict[Timer, tuple[int, asyncio.TimerHandle]] = {}
        self._tokens = 0

    def start(self, timer: Timer, delay_s: float, slack_s: float = 0.0) -> None:
        """(Re)arm `timer` to run out after `delay_s`, up to `slack_s` later: a running
        one of the same kind is replaced."""
        self.cancel(timer)
        self._tokens += 1
        token = self._tokens
        loop = asyncio.get_running_loop()
        when = coalesced(loop.time() + delay_s, slack_s)
        handle = loop.call_at(when, self._inbox.put_nowait, TimerDue(timer, token))
        self._armed[timer] = (token, handle)

    def deadline(self, timer: Timer) -> float | None:
        """When the armed `timer` runs out, in the loop's time; None: not armed."""
        entry = self._armed.get(timer)
        return entry[1].when() if entry is not None else None

    def cancel(self, timer: Timer) -> None:
        entry = self._armed.pop(timer, None)
        if entry is not None:
            entry[1].cancel()

    def cancel_all(self) -> None:
        for _, handle in self._armed.values():
            handle.cancel()
        self._armed.clear()

    def fired(self, due: TimerDue) -> bool:
        """Whether `due` is the current arming of its timer (then it is disarmed);
        False: cancelled or re-armed after this firing was queued."""
        current = self._armed.get(due.timer)
        if current is None or current[0] != due.token:
            return False
        del self._armed[due.timer]
        return True
