"""The StreamStatus websocket bridge: one resumable status stream per open page.

The page opens ``/ws?resume_after=<last event id>``, sends its token first
(``{"type": "auth", "token": ...}``; null with auth off), and then receives
``hello``, ``event`` and ``error`` messages as JSON. Each websocket gets its
own ``BrokerClient.watch_status`` made with that token, so the broker filters
the events to what the token may see; a page that reconnects passes its last
event id and misses nothing. Handshakes from another origin are refused
(cross-site websocket hijacking).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import grpc
from aiohttp import WSMsgType, web

from broker.dashboard.identity import BadToken, Clients, check_token, same_origin
from broker.dashboard.views import event_to_json
from broker_client import BrokerError, StatusWatch

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 10.0
"""How long a new websocket may take to send its auth message."""
MAX_MESSAGE = 4096
"""The page sends one small auth message; refuse anything big."""
#: Close codes the page understands (4000-4999 are the application's own).
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_STREAM_FAILED = 1011


class _Gone(Exception):
    """The page closed before it said who it is."""


class StatusBridge:
    """The /ws handler."""

    def __init__(self, clients: Clients, target: str) -> None:
        self.clients = clients
        self.target = target

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return web.Response(status=403, text="cross-origin websocket refused\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=30.0)
        await ws.prepare(request)
        try:
            token = await self._auth(ws)
        except BadToken as exc:
            await self._fail(ws, CLOSE_UNAUTHENTICATED, "UNAUTHENTICATED", str(exc))
            return ws
        except _Gone:
            return ws
        session_ids = [s for s in request.query.getall("session", []) if s]
        watch = self.clients.acting_as(token).watch_status(
            session_ids, resume_after=request.query.get("resume_after", ""))
        forward = asyncio.create_task(self._forward(ws, watch))
        closed = asyncio.create_task(self._drain(ws))
        try:
            await asyncio.wait({forward, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, closed):
                task.cancel()
            await asyncio.gather(forward, closed, return_exceptions=True)
            await watch.aclose()
            await ws.close()
        return ws

    async def _auth(self, ws: web.WebSocketResponse) -> str | None:
        """The token of the page's first message (None: none sent)."""
        try:
            msg = await ws.receive(timeout=AUTH_TIMEOUT_S)
        except TimeoutError:
            raise BadToken("send {\"type\": \"auth\", \"token\": ...} first") from None
        if msg.type != WSMsgType.TEXT:
            raise _Gone
        try:
            data = json.loads(msg.data)
        except ValueError:
            raise BadToken("the first message must be JSON") from None
        if not isinstance(data, dict) or data.get("type") != "auth":
            raise BadToken("the first message must be {\"type\": \"auth\", \"token\": ...}")
        return check_token(data.get("token"))

    @staticmethod
    async def _drain(ws: web.WebSocketResponse) -> None:
        """Read (and ignore) until the page closes."""
        async for _ in ws:
            pass

    async def _forward(self, ws: web.WebSocketResponse, watch: StatusWatch) -> None:
        await ws.send_json({"type": "hello", "target": self.target})
        try:
            async for event in watch:
                await ws.send_json({"type": "event", "event": event_to_json(event)})
        except ConnectionResetError:
            return
        except BrokerError as exc:
            # Refused (the page asks to sign in) or the client's reconnects gave up
            # (the page retries later): say which.
            log.warning("dashboard status stream failed: %s", exc)
            close = {grpc.StatusCode.UNAUTHENTICATED: CLOSE_UNAUTHENTICATED,
                     grpc.StatusCode.PERMISSION_DENIED: CLOSE_FORBIDDEN}
            await self._fail(ws, close.get(exc.code, CLOSE_STREAM_FAILED), exc.code.name,
                             exc.message or str(exc), exc.reason)

    @staticmethod
    async def _fail(ws: web.WebSocketResponse, close_code: int, code: str, message: str,
                    reason: str = "") -> None:
        with contextlib.suppress(ConnectionResetError):
            await ws.send_json({"type": "error", "code": code, "reason": reason,
                                "message": message})
            await ws.close(code=close_code, message=code.encode()[:120])
