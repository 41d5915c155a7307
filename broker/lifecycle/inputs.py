"""Events the session actor feeds to the machine.

Operator commands (`Start`, `Stop`, `Logout`), upstream happenings
(`LinkUp`, `Connected`, `QrReceived`, `Paired`, `Closed`, `PongReceived`,
`CredentialsUnreadable`), timers, and
ownership (`LeaseLost`). Time never enters except through `TimerFired`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.lifecycle.actions import Timer
from broker.lifecycle.reasons import DisconnectCode


@dataclass(frozen=True, slots=True)
class Start:
    """Operator start / restart: reset the counters and connect now."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Operator stop: close the connection if any and stay STOPPED."""


@dataclass(frozen=True, slots=True)
class Logout:
    """Operator logout: revoke the login upstream (if connected) and wipe credentials."""


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The connection `OpenConnection` asked for is up; its handshake begins."""


@dataclass(frozen=True, slots=True)
class Connected:
    """The upstream said `ready`: the session is usable."""


@dataclass(frozen=True, slots=True)
class QrReceived:
    """The upstream sent a (new) pairing QR code."""

    code: str
    index: int
    expires_in_ms: int


@dataclass(frozen=True, slots=True)
class Paired:
    """The QR was scanned; the upstream issued credentials (a 515 close follows)."""

    credentials: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection ended, or the attempt to open it failed."""

    code: DisconnectCode
    reason: str = ""
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class CredentialsUnreadable:
    """The stored credentials do not decrypt with any configured key (a wrong or
    rotated-away key): no attempt can succeed until a person configures it."""

    key_id: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired:
    """A timer armed by `StartTimer` ran out."""

    timer: Timer


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The upstream answered a keep-alive ping."""


@dataclass(frozen=True, slots=True)
class LeaseLost:
    """Another process owns the session now: let go without reconnecting."""


Event = (
    Start
    | Stop
    | Logout
    | LinkUp
    | Connected
    | QrReceived
    | Paired
    | Closed
    | CredentialsUnreadable
    | TimerFired
    | PongReceived
    | LeaseLost
)
