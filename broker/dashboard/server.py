"""The dashboard web server (aiohttp): the page, its assets, JSON actions, a websocket.

Routes: ``/`` the single page (``static/index.html``), ``/static/...`` its
script, styles and vendored charting library (no CDN: it works offline),
``/api/...`` JSON endpoints (api.py), ``/qr/<id>.svg`` pairing QR images, and
``/ws`` the StreamStatus bridge (bridge.py). The page keeps the signed-in
token in memory only and sends it on every request; the dashboard passes it
through as the gRPC call credentials (identity.py).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from aiohttp import web

from broker.api.auth import is_loopback
from broker.config import Settings
from broker.dashboard.api import DashboardApi, Handler
from broker.dashboard.bridge import StatusBridge
from broker.dashboard.identity import Clients
from broker.dashboard.views import error_json
from broker_client import BrokerClient

log = logging.getLogger(__name__)

WS_PATH = "/ws"
MAX_BODY = 64 * 1024
"""JSON requests are tiny; anything bigger is refused (413)."""
_SHUTDOWN_S = 2.0
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Everything comes from this origin: the page works offline and loads nothing else.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                               "style-src 'self' 'unsafe-inline'; connect-src 'self'",
}


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
    """Refuse a `--dashboard-listen` that could not work or would be open to anyone.

    With auth on, each tab signs in and its token authorizes its calls. With
    auth off anyone reaching the page could act, so it serves loopback only.
    Its client dials the broker's own port in plaintext, so with TLS the
    separate `broker dashboard --tls-ca ...` command is the way.
    """
    if not settings.dashboard_listen:
        return
    if settings.tls_cert_file:
        raise ValueError(
            "--dashboard-listen dials the broker in plaintext; with TLS run "
            "`broker dashboard --target HOST:PORT --tls-ca ...`"
        )
    if not settings.auth_tokens_file and not is_loopback(settings.dashboard_listen):
        raise ValueError(
            f"refusing to serve the dashboard on {settings.dashboard_listen} without "
            "authentication: anyone reaching it could manage every session. Pass "
            "--auth-tokens (people then sign in with a token) or listen on 127.0.0.1"
        )


def _static_dir() -> Path:
    return Path(str(resources.files("broker.dashboard").joinpath("static")))


@web.middleware
async def _finish(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; /api errors as JSON, whatever raised them."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            response = web.Response(status=exc.status, text=exc.text,
                                    content_type="application/json")
        elif request.path.startswith("/api/"):
            response = web.json_response(
                error_json(exc.status, exc.reason.upper().replace(" ", "_"), exc.reason),
                status=exc.status)
        else:
            response = web.Response(status=exc.status, text=f"{exc.status} {exc.reason}\n")
    if not response.prepared:
        response.headers.update(_SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
    return response


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
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("dashboard not started")
        return self._port

    @property
    def url(self) -> str:
        host, _ = split_listen(self.listen)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def application(self) -> web.Application:
        clients = Clients(self._client)
        static = _static_dir()
        page = (static / "index.html").read_bytes()

        async def index(request: web.Request) -> web.Response:
            return web.Response(body=page, content_type="text/html", charset="utf-8")

        app = web.Application(middlewares=[_finish], client_max_size=MAX_BODY)
        app.add_routes([web.get("/", index), web.get("/index.html", index)])
        app.add_routes(DashboardApi(clients, self.target).routes())
        app.add_routes([web.get(WS_PATH, StatusBridge(clients, self.target).handle)])
        app.router.add_static("/static/", static, follow_symlinks=False)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("dashboard already started")
        host, port = split_listen(self.listen)
        runner = web.AppRunner(self.application(), access_log=None,
                               shutdown_timeout=_SHUTDOWN_S, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        log.info("dashboard at %s (broker %s)", self.url, self.target)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> DashboardServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
