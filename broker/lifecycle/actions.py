"""What the machine asks the I/O side (the session actor) to do.

Actions are plain frozen values so tests can compare whole lists with `==`,
and so the actor executes them in order without consulting any machine state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from broker.lifecycle.reasons import DisconnectCode
from broker.lifecycle.states import State


class Timer(StrEnum):
    """The machine's timers; at most one of each kind runs at a time."""

    RETRY = "RETRY"
    KEEPALIVE = "KEEPALIVE"
    PONG = "PONG"
    #: From `LinkUp` until `ready`, re-armed by each QR code: an upstream that
    #: stops moving the handshake on would otherwise hold a session for ever.
    HANDSHAKE = "HANDSHAKE"


@dataclass(frozen=True, slots=True)
class OpenConnection:
    """Open a new upstream connection (the actor sends stored credentials, if any)."""


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the current connection.

    The actor must not feed a `Closed` event back for a connection the machine
    closed itself: the machine has already moved on.
    """

    code: DisconnectCode
    reason: str


@dataclass(frozen=True, slots=True)
class SendPing:
    """Send an application-level keep-alive ping."""


@dataclass(frozen=True, slots=True)
class SendLogout:
    """Ask the upstream to log out; it answers by closing with 401."""


@dataclass(frozen=True, slots=True)
class StartTimer:
    """(Re)arm a timer; replaces a running timer of the same kind."""

    timer: Timer
    delay_s: float
    slack_s: float = 0.0
    """It may run out up to this much late: the loop rounds its deadline up to a
    multiple of this step, so the timers of many sessions that fall in one step
    share one wake of the event loop (0: exactly on time)."""


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Disarm a timer; a `TimerFired` that races with this is ignored anyway."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class SaveCredentials:
    """Persist the credentials the upstream issued after pairing."""

    credentials: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ClearCredentials:
    """Wipe stored credentials: they are revoked (401) or corrupt (500)."""


@dataclass(frozen=True, slots=True)
class ClearKeys:
    """Wipe the session's key-value area (an engine's auth state: Baileys' creds
    and signal keys), fenced like every owner write: they are revoked (401) or
    no longer match what the upstream holds (500, 411). Always follows a
    ClearCredentials: a login whose credentials are gone has no use for keys."""


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish a status change.

    Emitted exactly once per state change, and again for each new QR code while
    PAIRING (then `state == previous`). Always the last action of a list.
    `held_s` is the part of `retry_in_s` the attempt budget added (0: none).
    """

    state: State
    previous: State
    reason: str
    code: int
    retry_in_s: float | None
    qr: str | None
    attempt: int
    held_s: float = 0.0


Action = (
    OpenConnection
    | CloseConnection
    | SendPing
    | SendLogout
    | StartTimer
    | CancelTimer
    | SaveCredentials
    | ClearCredentials
    | ClearKeys
    | Emit
)
