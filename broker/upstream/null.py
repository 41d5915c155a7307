"""The null engine: sessions that are open at once, with no socket (bench-only).

Selected by the upstream URL ``null://``. A link pairs on its first connect
(credentials ``{"null": <login>}``), reports ready at once, acks every send and
answers every ping, all in memory, so one machine can hold far more sessions
than real websockets allow. It exists for the control-plane scale benchmark
(`scripts/bench/scale.py`); it talks to no network and delivers nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from broker.content import Presence
from broker.lifecycle.reasons import DisconnectCode
from broker.store.kv import SessionKV
from broker.upstream.events import Acked, Disconnected, Paired, Pong, Ready, UpstreamEvent
from broker.upstream.provider import Outgoing, PairingUnavailable

SCHEME = "null://"


def is_null(url: str) -> bool:
    return url.startswith(SCHEME)


class NullLink:
    """One in-memory "connection": events come from a queue the calls feed."""

    __slots__ = ("_ended", "_events")

    def __init__(self, login: str, credentials: dict[str, Any] | None) -> None:
        self._events: asyncio.Queue[UpstreamEvent] = asyncio.Queue()
        self._ended = False
        if credentials is None:
            self._events.put_nowait(Paired({"null": login}))
        self._events.put_nowait(Ready(f"null-{login}"))

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Disconnected):
                return

    def _end(self, code: DisconnectCode, reason: str) -> None:
        if not self._ended:
            self._ended = True
            self._events.put_nowait(Disconnected(code, reason))

    async def send(self, messages: Sequence[Outgoing]) -> None:
        if not self._ended:
            for message in messages:
                self._events.put_nowait(Acked(message.message_id, False))

    async def send_presence(self, chat: str, presence: Presence) -> None:
        """Nobody to tell: the null engine has no chats."""

    async def ping(self, ping_id: int) -> None:
        if not self._ended:
            self._events.put_nowait(Pong(ping_id))

    async def logout(self) -> None:
        self._end(DisconnectCode.LOGGED_OUT, "logged out")

    async def ack_inbound(self, message_id: str) -> None:
        return None

    async def close(self, code: DisconnectCode, reason: str) -> None:
        self._end(code, reason)

    def abort(self) -> None:
        self._end(DisconnectCode.CONNECTION_CLOSED, "aborted")

    async def request_pairing_code(self, phone_number: str) -> str:
        raise PairingUnavailable("the null engine pairs on connect; it has no codes")


class NullProvider:
    async def connect(self, login: str, credentials: dict[str, Any] | None,
                      kv: SessionKV) -> NullLink:
        return NullLink(login, credentials)
