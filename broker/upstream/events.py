"""What a provider reports about its upstream connection, independent of wire format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.content import Content
from broker.lifecycle.reasons import DisconnectCode


@dataclass(frozen=True)
class Ready:
    """The upstream accepted the credentials: the session is open."""

    connection_id: str


@dataclass(frozen=True)
class QrCode:
    code: str
    index: int
    expires_in_ms: int


@dataclass(frozen=True)
class Paired:
    credentials: dict[str, Any]


@dataclass(frozen=True)
class Acked:
    message_id: str
    duplicate: bool


@dataclass(frozen=True)
class Refused:
    """The upstream will not take the message as it is (WhatsApp e.g. 463, 475)."""

    message_id: str
    code: int
    reason: str


@dataclass(frozen=True)
class Receipt:
    """The recipient's side reported the message "delivered", "read" or "played"."""

    message_id: str
    status: str = "delivered"


@dataclass(frozen=True)
class Pong:
    ping_id: int


@dataclass(frozen=True)
class Inbound:
    message_id: str
    sender: str
    body: str
    ts: float
    """When the sender sent it, by the upstream's clock (0: not reported)."""
    sender_lid: str = ""
    push_name: str = ""
    chat: str = ""
    content: Content | None = None
    """Beyond text: a medium (with its bytes, or the error that kept them away), a
    location, a reaction, the quoted message, mentions."""


@dataclass(frozen=True)
class Disconnected:
    """Always the last event of a link."""

    code: DisconnectCode
    reason: str
    retry_after_ms: int | None = None


UpstreamEvent = (
    Ready | QrCode | Paired | Acked | Refused | Receipt | Pong | Inbound | Disconnected
)
