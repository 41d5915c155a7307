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
    content: dict[str, Any] | None = None
    """The send frame's content as it arrived (docs/protocol.md "Content"), a medium's
    base64 `data` replaced by its `bytes` and `sha256` (the bytes: /control/media)."""


@dataclass(frozen=True)
class PresenceSeen:
    """One presence frame of an open connection."""

    to: str
    presence: str
    connection_id: str


@dataclass
class Overlap:
    """A connection of a login opened while an older one was still live."""

    older: str
    """The `client` the older connection said hello with ("" if none)."""
    newer: str
    older_connection: str
    newer_connection: str
    seconds: float | None = None
    """How long both were connected: until the older one's socket closed (None: still open)."""


@dataclass
class LoginRecord:
    """Everything observed for one login; counters only ever grow until reset()."""

    accepted: list[AcceptedMessage] = field(default_factory=list)
    connection_attempts: int = 0
    conflicts: int = 0
    duplicates: int = 0
    max_concurrent: int = 0
    """Most connections of this login live at one moment, counted before the
    older one is closed: 2 means a second connection met a live first one."""
    overlaps: list[Overlap] = field(default_factory=list)
    clients: dict[str, str] = field(default_factory=dict)
    """Connection id -> the `client` it said hello with: who delivered what."""
    drops: int = 0
    logouts: int = 0
    pings: int = 0
    qr_codes_sent: int = 0
    pairing_codes: list[str] = field(default_factory=list)
    """The phone number of every pairing code handed out, in order."""
    inbound_acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    """Ids of the messages the simulator refused (the `refuse` command)."""
    receipts: list[tuple[str, str]] = field(default_factory=list)
    """(message id, status) of every receipt sent on command (`receipt`)."""
    presence: list[PresenceSeen] = field(default_factory=list)
    media_drops: int = 0
    """Connections dropped while a medium arrived (the `drop_media` fault)."""

    def overlaps_by(self, client_prefix: str) -> list[Overlap]:
        """Overlaps in which both connections came from clients named so (e.g. "broker/")."""
        return [o for o in self.overlaps
                if o.older.startswith(client_prefix) and o.newer.startswith(client_prefix)]

    def accepted_ids(self) -> list[str]:
        return [message.id for message in self.accepted]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
