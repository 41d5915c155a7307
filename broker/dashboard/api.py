"""The dashboard's JSON endpoints and QR images, each a call made as the caller.

Every handler takes the caller's token from ``Authorization: Bearer ...`` and
makes its gRPC calls with it (see identity), so the broker decides; a refusal
comes back as JSON in plain words (the gRPC status, ErrorInfo reason and
message) with a 4xx status, never a 500.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from broker.dashboard.identity import BadToken, Clients, bearer, probe, same_origin
from broker.dashboard.views import (
    broker_error,
    error_json,
    health_to_json,
    qr_svg,
    session_to_json,
)
from broker_client import BrokerClient, BrokerError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Session actions the page can ask for, and the client call each one makes.
ACTIONS: dict[str, Callable[[BrokerClient, str], Awaitable[Any]]] = {
    "restart": BrokerClient.restart_session,
    "stop": BrokerClient.stop_session,
    "logout": BrokerClient.logout_session,
}


def json_error(status: int, code: str, message: str, reason: str = "") -> web.Response:
    return web.json_response(error_json(status, code, message, reason), status=status)


class DashboardApi:
    """Handlers for /api/... and /qr/<id>.svg over one channel to the broker."""

    def __init__(self, clients: Clients, target: str) -> None:
        self.clients = clients
        self.target = target

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/me", self._guard(self.me)),
            web.get("/api/sessions", self._guard(self.list_sessions)),
            web.post("/api/sessions", self._guard(self.create)),
            web.delete("/api/sessions/{session_id}", self._guard(self.delete)),
            web.post("/api/sessions/{session_id}/pairing-code", self._guard(self.pairing_code)),
            web.post("/api/sessions/{session_id}/{action}", self._guard(self.act)),
            web.get("/api/sessions/{session_id}/health", self._guard(self.health)),
            web.get(r"/qr/{session_id}.svg", self._guard(self.qr)),
        ]

    def _guard(self, handler: Callable[[web.Request, BrokerClient], Awaitable[web.Response]]
               ) -> Handler:
        """Resolve the caller, run the handler, turn refusals into JSON 4xx."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.method not in ("GET", "HEAD") and not same_origin(request):
                # Another site's page posting through a visitor's browser (CSRF): with
                # auth off nothing else would stop it.
                return json_error(403, "PERMISSION_DENIED", "cross-origin request refused")
            try:
                client = self.clients.acting_as(bearer(request.headers.get("Authorization")))
            except BadToken as exc:
                return json_error(401, "UNAUTHENTICATED", str(exc), "TOKEN_MALFORMED")
            try:
                return await handler(request, client)
            except BrokerError as exc:
                status, body = broker_error(exc)
                return web.json_response(body, status=status)

        return guarded

    # -- who ---------------------------------------------------------------

    async def me(self, request: web.Request, client: BrokerClient) -> web.Response:
        access = await probe(client)
        return web.json_response({
            "target": self.target,
            "can_view": access.can_view,
            "can_manage": access.can_manage,
            "pairing_code": True,
        })

    # -- sessions ----------------------------------------------------------

    async def list_sessions(self, request: web.Request, client: BrokerClient) -> web.Response:
        sessions = await client.list_sessions(request.query.get("tenant", ""))
        return web.json_response({"sessions": [session_to_json(s) for s in sessions]})

    async def create(self, request: web.Request, client: BrokerClient) -> web.Response:
        body = await _json_object(request)
        session_id, tenant = body.get("session_id"), body.get("tenant", "")
        if not isinstance(session_id, str) or not session_id:
            return json_error(400, "INVALID_ARGUMENT", "session_id: a session id is required")
        if not isinstance(tenant, str):
            return json_error(400, "INVALID_ARGUMENT", "tenant: must be a string")
        session = await client.create_session(session_id, tenant)
        return web.json_response({"session": session_to_json(session)}, status=201)

    async def act(self, request: web.Request, client: BrokerClient) -> web.Response:
        action = ACTIONS.get(request.match_info["action"])
        if action is None:
            return json_error(404, "NOT_FOUND", f"no action {request.match_info['action']!r}; "
                              f"one of {', '.join(ACTIONS)}, or DELETE the session")
        session = await action(client, request.match_info["session_id"])
        return web.json_response({"session": session_to_json(session)})

    async def delete(self, request: web.Request, client: BrokerClient) -> web.Response:
        session_id = request.match_info["session_id"]
        await client.delete_session(session_id)
        return web.json_response({"deleted": session_id})

    async def pairing_code(self, request: web.Request, client: BrokerClient) -> web.Response:
        body = await _json_object(request)
        phone = body.get("phone_number")
        if not isinstance(phone, str) or not phone:
            return json_error(400, "INVALID_ARGUMENT", "phone_number: a number like "
                              "+4915123456789 is required")
        code = await client.request_pairing_code(
            request.match_info["session_id"], phone)
        return web.json_response({"code": str(code)})

    async def health(self, request: web.Request, client: BrokerClient) -> web.Response:
        session_id = request.match_info["session_id"]
        found = [h for h in await client.health([session_id])
                 if h.session.session_id == session_id]
        if not found:
            return json_error(404, "NOT_FOUND", f"no session {session_id!r}")
        return web.json_response(health_to_json(found[0]))

    async def qr(self, request: web.Request, client: BrokerClient) -> web.Response:
        code = await client.get_qr(request.match_info["session_id"])
        svg = await asyncio.to_thread(qr_svg, code.qr)
        return web.Response(body=svg, content_type="image/svg+xml",
                            headers={"Cache-Control": "no-store"})


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 the page can show."""
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise _BadBody("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise _BadBody("the request body must be a JSON object")
    return body


class _BadBody(web.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(text=json.dumps(error_json(400, "INVALID_ARGUMENT", message)),
                         content_type="application/json")
