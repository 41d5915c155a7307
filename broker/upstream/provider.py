"""The provider interface: how the session actor talks to any upstream network.

A provider opens links; a link is one upstream connection. The actor only
sees `UpstreamEvent`s, so a provider for another wire protocol plugs in
without touching the lifecycle or delivery code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple, Protocol

from broker.content import Content, Presence
from broker.lifecycle.reasons import DisconnectCode
from broker.store.kv import SessionKV
from broker.upstream.events import UpstreamEvent


class PairingUnavailable(Exception):
    """The upstream gave no pairing code (the link is not pairing, or it refused)."""


class ConnectError(Exception):
    """The connection could not be opened at all (refused, timed out, bad handshake)."""

    def __init__(self, code: DisconnectCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Outgoing(NamedTuple):
    """A message to hand to the upstream; `content` (media, location, ...) is None
    for plain text in `body`."""

    message_id: str
    to: str
    body: str
    content: Content | None = None


class Link(Protocol):
    def events(self) -> AsyncIterator[UpstreamEvent]:
        """Events until the connection ends; the last one is always `Disconnected`."""
        ...

    async def send(self, messages: Sequence[Outgoing]) -> None:
        """Hand these messages to the upstream, in order (each ack comes back as an
        event), in as few writes as the connection allows: the delivery loop hands
        over every message that is due at once, tens of them under load."""
        ...

    async def send_presence(self, chat: str, presence: Presence) -> None:
        """Tell `chat` what the session is doing; best effort, nothing comes back."""
        ...

    async def ping(self, ping_id: int) -> None: ...

    async def logout(self) -> None: ...

    async def request_pairing_code(self, phone_number: str) -> str:
        """Ask the upstream for an 8-character pairing code for `phone_number`
        (E.164, validated by the caller), to be typed into the phone instead of
        scanning a QR. Only meaningful while the link is pairing; raises
        PairingUnavailable when the upstream cannot give one."""
        ...

    async def ack_inbound(self, message_id: str) -> None: ...

    async def close(self, code: DisconnectCode, reason: str) -> None: ...

    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake: fencing must
        not wait on a peer (or a network) that may not answer."""
        ...


class Provider(Protocol):
    async def connect(
        self, login: str, credentials: dict[str, Any] | None, kv: SessionKV
    ) -> Link:
        """Open a link and start the handshake; raises ConnectError.

        `kv` is the session's key-value area, fenced with the owner's token: an
        engine that keeps its own auth state (Baileys) reads and writes it there
        and nowhere else; the protocol-v1 provider ignores it."""
        ...
