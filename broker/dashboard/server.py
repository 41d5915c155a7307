"""The dashboard web server: one page, QR images and a StreamStatus websocket bridge.

Everything goes through the `websockets` library: ``process_request`` answers
the plain HTTP GETs (the page, ``/qr/<id>.svg``) and lets ``/ws`` through to
the websocket handshake. Each page's websocket gets its own resumable
``BrokerClient.watch_status`` stream, forwarded as JSON, so a page that
reconnects passes its last event id and misses nothing.

The QR payload never goes into the JSON: it is a login credential in waiting,
so it is only served as an image on the dashboard's own origin, and websocket
handshakes from another origin are refused (cross-site websocket hijacking).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import io
import json
import logging
import re
import time
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from broker.config import Settings
from broker_client import BrokerClient, BrokerError, StatusEvent, StatusWatch
from broker_client.v1 import broker_pb2 as pb

log = logging.getLogger(__name__)

WS_PATH = "/ws"
_QR_PATH = re.compile(r"/qr/([A-Za-z0-9][A-Za-z0-9._:-]{0,127})\.svg")
_CLOSE_TIMEOUT_S = 2.0


def split_listen(listen: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') into a bindable host and port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"dashboard listen address {listen!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def local_target(address: str) -> str:
    """A dialable address for a server bound to a wildcard host."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0"):
        return f"127.0.0.1:{port}"
    if host in ("[::]", "::"):
        return f"[::1]:{port}"
    return address


def check_embedded(settings: Settings) -> None:
    """Refuse `--dashboard-listen` where its loopback client could not get in.

    The embedded dashboard dials the broker's own port in plaintext without a
    token; with auth or TLS on, the separate `broker dashboard` command takes
    the credentials instead.
    """
    if settings.dashboard_listen and (settings.auth_tokens_file or settings.tls_cert_file):
        raise ValueError(
            "--dashboard-listen serves a plaintext, unauthenticated broker only; with auth "
            "or TLS run `broker dashboard --target HOST:PORT --token ... --tls-ca ...`"
        )


def _state(value: int) -> str:
    return pb.SessionState.Name(value)  # type: ignore[arg-type]


def event_to_json(event: StatusEvent, now_ms: int | None = None) -> dict[str, Any]:
    """What the page needs of one StatusEvent, without the QR payload.

    ``retry_left_ms`` is computed here, on the clock that stamped the event,
    so the page's countdown does not depend on the browser's clock.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    at_ms = event.at.ToMilliseconds() if event.HasField("at") else None
    retry_left_ms = 0
    if event.retry_in_ms:
        retry_left_ms = (
            event.retry_in_ms if at_ms is None else max(0, at_ms + event.retry_in_ms - now_ms)
        )
    return {
        "event_id": event.event_id,
        "session_id": event.session_id,
        "tenant": event.tenant,
        "sequence": event.sequence,
        "state": _state(event.state),
        "previous_state": _state(event.previous_state),
        "reason": event.reason,
        "code": event.code,
        "retry_in_ms": event.retry_in_ms,
        "retry_left_ms": retry_left_ms,
        "has_qr": bool(event.qr),
        "attempt": event.attempt,
        "at_ms": at_ms,
        "snapshot": event.snapshot,
        "resync": event.resync,
    }


def qr_svg(payload: str) -> bytes:
    """The QR code of payload as a standalone SVG document (rendered server-side)."""
    import qrcode
    import qrcode.image.svg

    image = qrcode.make(payload, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    buffer = io.BytesIO()
    image.save(buffer)
    return buffer.getvalue()


def _index_html() -> bytes:
    return resources.files("broker.dashboard").joinpath("static/index.html").read_bytes()


class DashboardServer:
    """Serves the dashboard for the broker at ``target``; start(), then stop()."""

    def __init__(
        self,
        target: str,
        listen: str = "127.0.0.1:8080",
        *,
        client: BrokerClient | None = None,
    ) -> None:
        self.target = target
        self.listen = listen
        self._client = client or BrokerClient(target)
        self._owns_client = client is None
        self._server: Server | None = None
        self._page = _index_html()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("dashboard not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        host, _ = split_listen(self.listen)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("dashboard already started")
        host, port = split_listen(self.listen)
        self._server = await serve(
            self._handle, host, port,
            process_request=self._process_request,
            close_timeout=_CLOSE_TIMEOUT_S,
            max_size=4096,  # the page sends nothing; refuse anything big
        )
        log.info("dashboard at %s (broker %s)", self.url, self.target)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- HTTP ------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            origin = request.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != request.headers.get("Host"):
                return _respond(http.HTTPStatus.FORBIDDEN, b"cross-origin websocket refused\n")
            return None  # go on with the websocket handshake
        if path in ("/", "/index.html"):
            return _respond(http.HTTPStatus.OK, self._page, "text/html; charset=utf-8")
        match = _QR_PATH.fullmatch(path)
        if match:
            return await self._qr(match.group(1))
        return _respond(http.HTTPStatus.NOT_FOUND, f"no such page {path}\n".encode())

    async def _qr(self, session_id: str) -> Response:
        try:
            code = await self._client.get_qr(session_id)
        except BrokerError as exc:
            # NOT_FOUND and NOT_PAIRING are the normal "nothing to scan" answers.
            status = {
                "NOT_FOUND": http.HTTPStatus.NOT_FOUND,
                "FAILED_PRECONDITION": http.HTTPStatus.NOT_FOUND,
                "UNAUTHENTICATED": http.HTTPStatus.FORBIDDEN,
                "PERMISSION_DENIED": http.HTTPStatus.FORBIDDEN,
            }.get(exc.code.name, http.HTTPStatus.BAD_GATEWAY)
            return _respond(status, f"{exc}\n".encode())
        svg = await asyncio.to_thread(qr_svg, code.qr)
        return _respond(http.HTTPStatus.OK, svg, "image/svg+xml")

    # -- websocket bridge ----------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        session_ids = [s for s in query.get("session", []) if s]
        resume_after = query.get("resume_after", [""])[0]
        watch = self._client.watch_status(session_ids, resume_after=resume_after)
        forward = asyncio.create_task(self._forward(ws, watch))
        closed = asyncio.create_task(ws.wait_closed())
        try:
            await asyncio.wait({forward, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (forward, closed):
                task.cancel()
            await asyncio.gather(forward, closed, return_exceptions=True)
            await watch.aclose()

    async def _forward(self, ws: ServerConnection, watch: StatusWatch) -> None:
        await ws.send(json.dumps({"type": "hello", "target": self.target}))
        try:
            async for event in watch:
                await ws.send(json.dumps({"type": "event", "event": event_to_json(event)}))
        except ConnectionClosed:
            return
        except BrokerError as exc:
            # The client's own reconnects gave up: tell the page, which retries later.
            log.warning("dashboard status stream failed: %s", exc)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "error", "message": str(exc)}))
                await ws.close(1011, "status stream failed")


def _respond(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain") -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)
