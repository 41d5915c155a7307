"""The dashboard's HTTP, JSON and websocket surface over loopback, without a browser.

A real broker (with and without auth), the real aiohttp dashboard, a real
aiohttp client and real websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from broker.app import BrokerApp
from broker.auth.tokens import Role
from broker.config import Settings
from broker.dashboard import DashboardServer
from broker.dashboard.server import check_embedded
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.conftest import BrokerFactory
from tests.helpers import paired_session, wait_state
from tests.ops.auth_fixtures import Tokens, token_file


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
async def dashboard_app(make_broker: BrokerFactory) -> BrokerApp:
    return await make_broker(dashboard_listen="127.0.0.1:0")


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return token_file(tmp_path / "tokens.json", {
        "admin": (Role.ADMIN, ("*",), None),
        "viewer": (Role.VIEWER, ("*",), None),
        "worker": (Role.WORKER, ("*",), None),
        "acme-admin": (Role.ADMIN, ("acme",), None),
        "expired": (Role.ADMIN, ("*",), -10.0),
    })


@pytest.fixture
async def auth_app(make_broker: BrokerFactory, tokens: Tokens) -> BrokerApp:
    return await make_broker(dashboard_listen="127.0.0.1:0", auth_tokens_file=str(tokens.path))


def _url(app: BrokerApp, path: str = "") -> str:
    assert app.dashboard is not None
    return app.dashboard.url + path


def _ws_url(app: BrokerApp, query: str = "") -> str:
    return _url(app).replace("http://", "ws://") + "ws" + query


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def call(http: aiohttp.ClientSession, method: str, url: str, *,
               token: str | None = None, body: Any = None, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    all_headers = {**(_bearer(token) if token else {}), **(headers or {})}
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with http.request(method, url, data=data, headers=all_headers) as response:
        kind = response.headers.get("Content-Type", "")
        payload = await (response.json() if kind.startswith("application/json")
                         else response.read())
        return response.status, payload


async def _until_closed(ws: Any) -> list[dict[str, Any]]:
    """Every message until the dashboard closes the websocket (any close code)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionClosed):
            while True:
                messages.append(json.loads(await ws.recv()))
    return messages


async def _events(ws: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(events) < count:
            message = json.loads(await ws.recv())
            if message["type"] == "event":
                events.append(message["event"])
    return events


async def test_page_assets_and_qr_image(dashboard_app: BrokerApp,
                                        http: aiohttp.ClientSession) -> None:
    assert dashboard_app.manager is not None
    async with http.get(_url(dashboard_app)) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "stateHistory" in page and "/static/vendor/uPlot.iife.min.js" in page
    # Everything the page loads is served here (it works offline).
    for asset in ("/static/app.js", "/static/app.css", "/static/vendor/uPlot.iife.min.js",
                  "/static/vendor/uPlot.min.css"):
        async with http.get(_url(dashboard_app, asset.lstrip("/"))) as response:
            assert response.status == 200, asset
            assert len(await response.read()) > 100
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page

    status, _ = await call(http, "GET", _url(dashboard_app, "qr/nobody.svg"))
    assert status == 404
    await dashboard_app.manager.create("962302", "")
    await wait_state(dashboard_app, "962302", State.PAIRING)
    async with http.get(_url(dashboard_app, "qr/962302.svg")) as response:
        assert (response.status, response.content_type) == (200, "image/svg+xml")
        svg = await response.read()
    assert b"<svg" in svg and b"<path" in svg
    async with http.get(_url(dashboard_app, "nothing-here")) as response:
        assert response.status == 404 and response.headers["X-Frame-Options"] == "DENY"
    assert (await call(http, "GET", _url(dashboard_app, "static/../server.py")))[0] in (403, 404)


async def test_websocket_forwards_snapshot_and_live_events(
    sim: Simulator, dashboard_app: BrokerApp
) -> None:
    await paired_session(dashboard_app, sim, "962302")
    async with connect(_ws_url(dashboard_app)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": None}))
        hello = json.loads(await ws.recv())
        assert hello == {"type": "hello", "target": dashboard_app.address}
        [snapshot] = await _events(ws, 1)
        assert snapshot["snapshot"] and snapshot["state"] == "OPEN"
        assert "qr" not in snapshot  # the pairing secret only travels as a same-origin image
        assert await sim.drop("962302")
        live: list[dict[str, Any]] = []
        while not live or live[-1]["state"] != "OPEN":
            live += await _events(ws, 1)
    states = [e["state"] for e in live]
    # The countdown is forwarded (full jitter may make it 0 ms with test timings).
    assert states[0] == "RECONNECTING" and live[0]["retry_in_ms"] >= 0
    assert [e["sequence"] for e in live] == sorted(e["sequence"] for e in live)

    # A page that reconnects with its last event id gets nothing twice.
    async with connect(_ws_url(dashboard_app, f"?resume_after={live[-1]['event_id']}")) as ws:
        await ws.send(json.dumps({"type": "auth"}))
        await ws.recv()  # hello
        assert dashboard_app.manager is not None
        await dashboard_app.manager.stop("962302")
        [after] = await _events(ws, 1)
    assert after["state"] == "STOPPED" and not after["snapshot"]


async def test_cross_origin_websocket_is_refused(dashboard_app: BrokerApp) -> None:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(_ws_url(dashboard_app), origin="http://evil.example"):  # type: ignore[arg-type]
            pass
    assert caught.value.response.status_code == 403


async def test_cross_origin_actions_are_refused(dashboard_app: BrokerApp,
                                                http: aiohttp.ClientSession) -> None:
    """Another site's form posting through a visitor's browser (CSRF) acts on nothing."""
    status, body = await call(http, "POST", _url(dashboard_app, "api/sessions"),
                              body={"session_id": "csrf"},
                              headers={"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in body["error"]["message"]
    assert dashboard_app.manager is not None
    assert await dashboard_app.manager.store.get_session("csrf") is None
    host = _url(dashboard_app).removeprefix("http://").rstrip("/")
    status, _ = await call(http, "POST", _url(dashboard_app, "api/sessions"),
                           body={"session_id": "same"}, headers={"Origin": f"http://{host}"})
    assert status == 201


async def test_actions_without_auth(sim: Simulator, dashboard_app: BrokerApp,
                                    http: aiohttp.ClientSession) -> None:
    status, me = await call(http, "GET", _url(dashboard_app, "api/me"))
    assert status == 200 and me["can_view"] and me["can_manage"]
    status, body = await call(http, "POST", _url(dashboard_app, "api/sessions"),
                              body={"session_id": "d1", "tenant": "acme"})
    assert status == 201 and body["session"]["tenant"] == "acme"
    await wait_state(dashboard_app, "d1", State.PAIRING)
    assert await sim.scan("d1")
    await wait_state(dashboard_app, "d1", State.OPEN)
    for action, state in (("stop", State.STOPPED), ("restart", State.OPEN),
                          ("logout", State.LOGGED_OUT)):
        status, body = await call(http, "POST", _url(dashboard_app, f"api/sessions/d1/{action}"))
        assert status == 200, body
        await wait_state(dashboard_app, "d1", state)
    status, listing = await call(http, "GET", _url(dashboard_app, "api/sessions"))
    assert [s["session_id"] for s in listing["sessions"]] == ["d1"]
    status, body = await call(http, "DELETE", _url(dashboard_app, "api/sessions/d1"))
    assert (status, body) == (200, {"deleted": "d1"})
    status, listing = await call(http, "GET", _url(dashboard_app, "api/sessions"))
    assert listing["sessions"] == []


async def test_pairing_by_phone_code(sim: Simulator, dashboard_app: BrokerApp,
                                    http: aiohttp.ClientSession) -> None:
    """Several sessions pair through the page's phone-code action, each with its own code."""
    sids = [f"pc{i}" for i in range(4)]
    for sid in sids:
        status, _ = await call(http, "POST", _url(dashboard_app, "api/sessions"),
                               body={"session_id": sid})
        assert status == 201
    codes = {}
    for sid in sids:
        await wait_state(dashboard_app, sid, State.PAIRING)
        status, body = await call(
            http, "POST", _url(dashboard_app, f"api/sessions/{sid}/pairing-code"),
            body={"phone_number": "+4915123456789"})
        assert status == 200, body
        assert len(body["code"]) == 8
        codes[sid] = body["code"]
    assert len(set(codes.values())) == len(sids)
    for sid, code in codes.items():
        assert await sim.enter_code(code) == sid
    for sid in sids:
        await wait_state(dashboard_app, sid, State.OPEN)
    status, body = await call(
        http, "POST", _url(dashboard_app, f"api/sessions/{sids[0]}/pairing-code"),
        body={"phone_number": "+4915123456789"})
    assert status == 409 and body["error"]["reason"] == "NOT_PAIRING", body


async def test_health_endpoint(sim: Simulator, dashboard_app: BrokerApp,
                               http: aiohttp.ClientSession) -> None:
    await paired_session(dashboard_app, sim, "h1")
    async with BrokerClient(dashboard_app.address) as client:
        await client.send("h1", "+15550001", "hello")
    status, health = await call(http, "GET", _url(dashboard_app, "api/sessions/h1/health"))
    assert status == 200
    assert health["session"]["state"] == "OPEN"
    assert health["counters"]["messages_accepted"] == 1
    assert health["counters"]["messages_acked"] == 1
    assert [t["to"] for t in health["recent"]][-1] == "OPEN"
    assert all(t["at_ms"] for t in health["recent"])
    await sim.logout("h1")
    await wait_state(dashboard_app, "h1", State.LOGGED_OUT)
    status, health = await call(http, "GET", _url(dashboard_app, "api/sessions/h1/health"))
    assert any("broker qr h1" in r["message"] or "pair" in r["message"].lower()
               for r in health["recommendations"]), health["recommendations"]


async def test_the_signed_in_token_decides(sim: Simulator, auth_app: BrokerApp, tokens: Tokens,
                                           http: aiohttp.ClientSession) -> None:
    """With auth on, the embedded dashboard starts and each call carries the tab's token."""
    status, body = await call(http, "GET", _url(auth_app, "api/me"))
    assert status == 401 and body["error"]["reason"] == "TOKEN_MISSING"
    status, me = await call(http, "GET", _url(auth_app, "api/me"), token=tokens["viewer"])
    assert status == 200 and (me["can_view"], me["can_manage"]) == (True, False)
    status, me = await call(http, "GET", _url(auth_app, "api/me"), token=tokens["admin"])
    assert status == 200 and (me["can_view"], me["can_manage"]) == (True, True)

    status, body = await call(http, "POST", _url(auth_app, "api/sessions"),
                              token=tokens["viewer"], body={"session_id": "a1"})
    assert status == 403 and body["error"]["reason"] == "WRONG_ROLE"
    assert "viewer" in body["error"]["message"]
    status, body = await call(http, "POST", _url(auth_app, "api/sessions"),
                              token=tokens["admin"], body={"session_id": "a1", "tenant": "acme"})
    assert status == 201
    status, body = await call(http, "POST", _url(auth_app, "api/sessions"),
                              token=tokens["acme-admin"],
                              body={"session_id": "g1", "tenant": "globex"})
    assert status == 403 and body["error"]["reason"] == "WRONG_TENANT"
    await wait_state(auth_app, "a1", State.PAIRING)
    # The QR image too: only for a token that may view the session.
    assert (await call(http, "GET", _url(auth_app, "qr/a1.svg")))[0] == 401
    status, svg = await call(http, "GET", _url(auth_app, "qr/a1.svg"), token=tokens["viewer"])
    assert status == 200 and b"<svg" in svg
    status, body = await call(http, "POST", _url(auth_app, "api/sessions/a1/stop"),
                              token=tokens["viewer"])
    assert status == 403

    # The websocket: its first message carries the token.
    async with connect(_ws_url(auth_app)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": tokens["viewer"]}))
        assert json.loads(await ws.recv())["type"] == "hello"
        [snapshot] = await _events(ws, 1)
        assert snapshot["session_id"] == "a1"
    async with connect(_ws_url(auth_app)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": None}))
        messages = await _until_closed(ws)
        assert messages[-1]["type"] == "error" and messages[-1]["code"] == "UNAUTHENTICATED"
        assert ws.close_code == 4401
    async with connect(_ws_url(auth_app)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": tokens["worker"]}))
        messages = await _until_closed(ws)
        assert messages[-1]["code"] == "PERMISSION_DENIED" and ws.close_code == 4403


@pytest.mark.parametrize("method, path, body, raw, expected", [
    ("POST", "api/sessions", None, b"{not json", 400),
    ("POST", "api/sessions", None, b"[1, 2]", 400),
    ("POST", "api/sessions", {}, None, 400),
    ("POST", "api/sessions", {"session_id": 7}, None, 400),
    ("POST", "api/sessions", {"session_id": "ok", "tenant": ["x"]}, None, 400),
    ("POST", "api/sessions", {"session_id": "bad id with spaces"}, None, 400),
    ("POST", "api/sessions", {"session_id": "x" * 500}, None, 400),
    ("POST", "api/sessions", {"session_id": "\u00e9\u0000"}, None, 400),
    ("POST", "api/sessions", None, b"\xff\xfe", 400),
    ("POST", "api/sessions", None, b"{" + b" " * 70000 + b"}", 413),
    ("POST", "api/sessions/nobody/stop", None, None, 404),
    ("POST", "api/sessions/nobody/explode", None, None, 404),
    ("POST", "api/sessions/bad%20id/restart", None, None, 400),
    ("DELETE", "api/sessions/nobody", None, None, 404),
    ("GET", "api/sessions/nobody/health", None, None, 404),
    ("GET", "api/sessions/bad%20id/health", None, None, 400),
    ("PUT", "api/sessions", None, None, 405),
    ("GET", "api/nothing", None, None, 404),
    ("POST", "api/sessions/nobody/pairing-code", {"phone_number": "+4915123456789"}, None, None),
])
async def test_hostile_input_gets_a_clear_4xx(
    dashboard_app: BrokerApp, http: aiohttp.ClientSession, method: str, path: str,
    body: Any, raw: bytes | None, expected: int | None,
) -> None:
    status, answer = await call(http, method, _url(dashboard_app, path), body=body, raw=raw)
    assert 400 <= status < 500 or (expected is None and status == 501), (status, answer)
    if expected is not None:
        assert status == expected, answer
    assert isinstance(answer, dict) and answer["error"]["message"], answer


@pytest.mark.parametrize("header", [
    "Bearer", "Basic abc", "Bearer two words", "Bearer \u00e9t\u00e9", "Bearer " + "a" * 600,
])
async def test_bad_tokens_get_401(auth_app: BrokerApp, tokens: Tokens,
                                  http: aiohttp.ClientSession, header: str) -> None:
    status, body = await call(http, "GET", _url(auth_app, "api/sessions"),
                              headers={"Authorization": header})
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED", body


async def test_wrong_and_expired_tokens_say_why(auth_app: BrokerApp, tokens: Tokens,
                                                http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", _url(auth_app, "api/me"),
                              token="brk_0123456789abcdef_" + "x" * 43)
    assert status == 401 and body["error"]["reason"] == "TOKEN_INVALID"
    status, body = await call(http, "GET", _url(auth_app, "api/me"), token=tokens["expired"])
    assert status == 401 and body["error"]["reason"] == "TOKEN_EXPIRED"
    status, body = await call(http, "GET", _url(auth_app, "api/me"), token="not-a-token")
    assert status == 401 and body["error"]["reason"] == "TOKEN_MALFORMED"
    async with connect(_ws_url(auth_app)) as ws:
        await ws.send("not json")
        messages = await _until_closed(ws)
        assert messages[-1]["code"] == "UNAUTHENTICATED" and ws.close_code == 4401


async def test_standalone_dashboard_reports_an_unreachable_broker(
    http: aiohttp.ClientSession,
) -> None:
    client = BrokerClient("127.0.0.1:1", timeout=5, retry_attempts=1)
    async with DashboardServer("127.0.0.1:1", "127.0.0.1:0", client=client) as server:
        status, body = await call(http, "GET", server.url + "qr/962302.svg")
        assert status == 503, body
        assert body["error"]["code"] == "UNAVAILABLE"
    await client.close()


def test_embedded_dashboard_settings() -> None:
    # Auth on: people sign in. TLS: its plaintext loopback client cannot dial.
    check_embedded(Settings(dashboard_listen="127.0.0.1:0"))
    check_embedded(Settings(dashboard_listen="0.0.0.0:8080", auth_tokens_file="tokens.json"))
    with pytest.raises(ValueError, match="broker dashboard --target"):
        check_embedded(Settings(dashboard_listen="127.0.0.1:0", tls_cert_file="cert.pem"))
    with pytest.raises(ValueError, match="without authentication"):
        check_embedded(Settings(dashboard_listen="0.0.0.0:8080"))


async def test_random_ids_and_bodies_never_crash_it(dashboard_app: BrokerApp,
                                                    http: aiohttp.ClientSession) -> None:
    """Seeded random junk (unicode, control characters, slashes, huge, wrong types) in
    paths and bodies: every answer is JSON and below 500."""
    rng = random.Random(15)
    alphabet = "aZ09._:-/ %?#\\\"'<>\u00e9\u0000\u202e\U0001f600\n\t"

    def junk() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.choice((1, 3, 20, 140))))

    values: list[Any] = [None, 0, -1, 2**70, 1.5, True, [], {}, ["x"], {"a": 1}]
    for _ in range(60):
        sid = quote(junk(), safe="")
        method, path = rng.choice([
            ("POST", f"api/sessions/{sid}/stop"), ("POST", f"api/sessions/{sid}/logout"),
            ("POST", f"api/sessions/{sid}/restart"), ("DELETE", f"api/sessions/{sid}"),
            ("GET", f"api/sessions/{sid}/health"), ("GET", f"qr/{sid}.svg"),
            ("POST", "api/sessions"),
        ])
        body = {"session_id": rng.choice([junk(), *values]),
                "tenant": rng.choice([junk(), "", *values])}
        status, answer = await call(http, method, _url(dashboard_app, path), body=body)
        assert status < 500, (method, path, body, status, answer)
        if status >= 400:
            assert isinstance(answer, dict) and answer["error"]["message"], answer


async def test_standalone_dashboard_uses_its_token_until_a_tab_signs_in(
    make_broker: BrokerFactory, tokens: Tokens, http: aiohttp.ClientSession
) -> None:
    """`broker dashboard --token <viewer>`: tabs that have not signed in see as that
    viewer; a tab that signs in as admin acts as the admin, on the same channel."""
    app = await make_broker(auth_tokens_file=str(tokens.path))
    client = BrokerClient(app.address, token=tokens["viewer"])
    async with DashboardServer(app.address, "127.0.0.1:0", client=client) as server:
        status, me = await call(http, "GET", server.url + "api/me")
        assert status == 200 and (me["can_view"], me["can_manage"]) == (True, False)
        status, _ = await call(http, "POST", server.url + "api/sessions",
                               body={"session_id": "s1"})
        assert status == 403
        status, me = await call(http, "GET", server.url + "api/me", token=tokens["admin"])
        assert status == 200 and me["can_manage"]
        status, _ = await call(http, "POST", server.url + "api/sessions",
                               token=tokens["admin"], body={"session_id": "s1"})
        assert status == 201
    await client.close()
