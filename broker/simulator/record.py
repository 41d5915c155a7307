"""What the simulator remembers about each login, so tests can assert on it.

Kept apart from the server so the HTTP control endpoint and in-process tests
read exactly the same data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AcceptedMessage:
    """One message the simulator accepted (first acceptance of its id only)."""

    id: str
    to: str
    body: str
    connection_id: str


@dataclass
class LoginRecord:
    """Everything observed for one login; counters only ever grow until reset()."""

    accepted: list[AcceptedMessage] = field(default_factory=list)
    connection_attempts: int = 0
    conflicts: int = 0
    duplicates: int = 0
    max_concurrent: int = 0
    drops: int = 0
    logouts: int = 0
    pings: int = 0
    qr_codes_sent: int = 0
    inbound_acked: list[str] = field(default_factory=list)

    def accepted_ids(self) -> list[str]:
        return [message.id for message in self.accepted]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
