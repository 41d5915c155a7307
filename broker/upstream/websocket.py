"""Provider for the JSON-over-websocket protocol of docs/protocol.md."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import Close

from broker.content import Presence
from broker.lifecycle.reasons import DisconnectCode
from broker.store.kv import SessionKV
from broker.upstream import protocol as p
from broker.upstream.events import (
    Acked,
    Disconnected,
    Inbound,
    Paired,
    Pong,
    QrCode,
    Ready,
    Receipt,
    Refused,
    UpstreamEvent,
)
from broker.upstream.provider import ConnectError, Outgoing, PairingUnavailable

PAIRING_CODE_TIMEOUT_S = 10.0
"""How long `request_pairing_code` waits for the upstream's answer."""


class BurstConnection(ClientConnection):
    """A websockets client connection that can write several text frames at once.

    `send()` writes one message per call: it checks the state, frames the
    message, writes it to the socket and waits for the buffer to drain. The
    delivery loop often has tens of messages due together (about 30 under
    SendStream c=64), each of them paying that and a socket write
    (scripts/bench/NOTES.md, stop 17). `send_texts` frames them all inside one
    `send_context` (websockets' own context for writing from user code: state
    check on entry, write and flow control on exit), and `send_data` hands
    what the protocol produced to the transport in one write.
    """

    async def send_texts(self, texts: Sequence[str]) -> None:
        """Send each string as one text message, in order; raises ConnectionClosed."""
        async with self.send_context():
            for text in texts:
                self.protocol.send_text(text.encode())

    def send_data(self) -> None:
        """What websockets' `send_data` does, with consecutive frames in one write."""
        pending: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                pending.append(data)
                continue
            # the end of the stream: half-close the TCP connection when possible
            if pending:
                self.transport.write(b"".join(pending))
                pending = []
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):
                    self.transport.write_eof()
            else:
                self.transport.close()
        if pending:
            self.transport.write(b"".join(pending))


class WebsocketLink:
    def __init__(self, ws: BurstConnection) -> None:
        self._ws = ws
        self._retry_after_ms: int | None = None
        self._local_close: tuple[DisconnectCode, str] | None = None
        self._code_requests: dict[int, asyncio.Future[p.PairingCode]] = {}
        self._request_ids = itertools.count(1)

    async def events(self) -> AsyncIterator[UpstreamEvent]:
        while True:
            try:
                raw = await self._ws.recv()
            except ConnectionClosed as exc:
                self._fail_code_requests()
                yield self._disconnected(exc.rcvd)
                return
            try:
                # Message frames may carry a medium; the link reads what the
                # upstream sends, as the upstream reads send frames.
                frame = p.decode(raw, max_bytes=p.MAX_SEND_FRAME_BYTES)
            except p.ProtocolError as exc:
                # A hostile or broken upstream must not crash the actor: drop the
                # link and let the lifecycle reconnect with backoff.
                self._local_close = (DisconnectCode.CONNECTION_CLOSED, f"bad frame: {exc}")
                await self._ws.close(p.close_code_for(DisconnectCode.BAD_FRAME), "bad frame")
                self._fail_code_requests()
                yield self._disconnected(None)
                return
            event = self._translate(frame)
            if event is not None:
                yield event

    def _translate(self, frame: p.Frame) -> UpstreamEvent | None:
        match frame:
            case p.Ready(connection_id=cid):
                return Ready(cid)
            case p.Qr(code=code, index=index, expires_in_ms=expires):
                return QrCode(code, index, expires)
            case p.Paired(credentials=creds):
                return Paired(creds)
            case p.Ack(id=mid, duplicate=dup):
                return Acked(mid, dup)
            case p.Refused(id=mid, code=code, reason=why):
                return Refused(mid, code, why)
            case p.Receipt(id=mid, status=status):
                return Receipt(mid, status)
            case p.Pong(id=pid):
                return Pong(pid)
            case p.Message(id=mid, sender=sender, body=body, ts=ts, content=content):
                return Inbound(mid, sender, body, ts, content=content)
            case p.Error(retry_after_ms=retry):
                self._retry_after_ms = retry
                return None
            case p.PairingCode(id=rid):
                waiter = self._code_requests.pop(rid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
                return None
            case _:
                return None

    def _disconnected(self, rcvd: Close | None) -> Disconnected:
        if self._local_close is not None:
            code, reason = self._local_close
            return Disconnected(code, reason)
        code = p.reason_for_close(rcvd.code if rcvd else None)
        reason = (rcvd.reason if rcvd and rcvd.reason else "") or code.text
        if rcvd is None:
            reason = "connection lost"
        return Disconnected(code, reason, self._retry_after_ms)

    async def _send(self, frame: p.Frame) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reader reports the disconnect
            await self._ws.send(p.encode(frame))

    async def send(self, messages: Sequence[Outgoing]) -> None:
        texts = [p.encode(p.Send(id=m.message_id, to=m.to, body=m.body, content=m.content))
                 for m in messages]
        with contextlib.suppress(ConnectionClosed):  # the reader reports the disconnect
            await self._ws.send_texts(texts)

    async def send_presence(self, chat: str, presence: Presence) -> None:
        await self._send(p.PresenceUpdate(to=chat, presence=presence))

    async def ping(self, ping_id: int) -> None:
        await self._send(p.Ping(id=ping_id))

    async def logout(self) -> None:
        await self._send(p.Logout())

    async def request_pairing_code(self, phone_number: str) -> str:
        """Answered through the reader (`events`), which must be running."""
        rid = next(self._request_ids)
        waiter: asyncio.Future[p.PairingCode] = asyncio.get_running_loop().create_future()
        self._code_requests[rid] = waiter
        try:
            await self._send(p.PairingCodeRequest(id=rid, phone=phone_number))
            async with asyncio.timeout(PAIRING_CODE_TIMEOUT_S):
                answer = await waiter
        except TimeoutError:
            raise PairingUnavailable("the upstream did not answer the pairing code "
                                     "request in time") from None
        finally:
            self._code_requests.pop(rid, None)
        if not answer.code:
            raise PairingUnavailable(answer.reason or "the upstream gave no pairing code")
        return answer.code

    def _fail_code_requests(self) -> None:
        for waiter in self._code_requests.values():
            if not waiter.done():
                waiter.set_exception(PairingUnavailable("the connection closed"))
        self._code_requests.clear()

    async def ack_inbound(self, message_id: str) -> None:
        await self._send(p.InboundAck(id=message_id))

    async def close(self, code: DisconnectCode, reason: str) -> None:
        self._local_close = (code, reason)
        await self._ws.close(1000, reason[:100])

    def abort(self) -> None:
        self._local_close = (DisconnectCode.CONNECTION_CLOSED, "lease lost: connection dropped")
        self._ws.transport.abort()


class WebsocketProvider:
    def __init__(self, url: str, *, connect_timeout_s: float = 10.0, client: str = "") -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.client = client
        """Sent in every hello, so the upstream can tell who holds a login."""

    async def connect(
        self, login: str, credentials: dict[str, Any] | None, kv: SessionKV | None = None
    ) -> WebsocketLink:
        """`kv` is unused: protocol-v1 credentials are the opaque map the upstream sent."""
        try:
            ws = await connect(
                self.url,
                open_timeout=self.connect_timeout_s,
                # Keep-alive is the lifecycle's application-level ping, which the
                # upstream counts as activity; protocol pings would hide a dead peer.
                ping_interval=None,
                close_timeout=2,
                max_size=p.MAX_SEND_FRAME_BYTES,
                # No permessage-deflate: frames are small JSON, and each
                # connection's zlib state cost ~50 KB of RSS per session and
                # CPU on every frame (docs/benchmarks.md).
                compression=None,
                create_connection=BurstConnection,
            )
        except (TimeoutError, OSError, InvalidHandshake, InvalidURI) as exc:
            raise ConnectError(DisconnectCode.CONNECTION_CLOSED, f"cannot connect: {exc}") from exc
        assert isinstance(ws, BurstConnection)  # create_connection above
        link = WebsocketLink(ws)
        await link._send(p.Hello(login=login, credentials=credentials, client=self.client))
        return link
