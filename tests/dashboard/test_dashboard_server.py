"""The dashboard's HTTP and websocket surface, without a browser."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from broker.app import BrokerApp
from broker.config import Settings
from broker.dashboard import DashboardServer
from broker.dashboard.server import check_embedded
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.conftest import BrokerFactory
from tests.helpers import paired_session, wait_state


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


async def get(url: str) -> tuple[int, str, bytes]:
    # urllib blocks: run it off the loop that serves the dashboard.
    return await asyncio.to_thread(_get, url)


@pytest.fixture
async def dashboard_app(make_broker: BrokerFactory) -> BrokerApp:
    return await make_broker(dashboard_listen="127.0.0.1:0")


def _ws_url(app: BrokerApp, query: str = "") -> str:
    assert app.dashboard is not None
    return app.dashboard.url.replace("http://", "ws://") + "ws" + query


async def _events(ws: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while len(events) < count:
            message = json.loads(await ws.recv())
            if message["type"] == "event":
                events.append(message["event"])
    return events


async def test_page_and_qr_image(dashboard_app: BrokerApp) -> None:
    assert dashboard_app.dashboard is not None and dashboard_app.manager is not None
    url = dashboard_app.dashboard.url
    status, kind, body = await get(url)
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert b"stateHistory" in body

    status, _, _ = await get(url + "qr/nobody.svg")
    assert status == 404
    await dashboard_app.manager.create("962302", "")
    await wait_state(dashboard_app, "962302", State.PAIRING)
    status, kind, body = await get(url + "qr/962302.svg")
    assert (status, kind) == (200, "image/svg+xml")
    assert b"<svg" in body and b"<path" in body
    assert (await get(url + "nothing-here"))[0] == 404


async def test_websocket_forwards_snapshot_and_live_events(
    sim: Simulator, dashboard_app: BrokerApp
) -> None:
    await paired_session(dashboard_app, sim, "962302")
    async with connect(_ws_url(dashboard_app)) as ws:
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


async def test_standalone_dashboard_reports_an_unreachable_broker() -> None:
    client = BrokerClient("127.0.0.1:1", timeout=5, retry_attempts=1)
    async with DashboardServer("127.0.0.1:1", "127.0.0.1:0", client=client) as server:
        status, _, body = await get(server.url + "qr/962302.svg")
    await client.close()
    assert status == 502, body


def test_embedded_dashboard_refuses_auth_and_tls() -> None:
    # Its loopback client has no token and speaks plaintext: say so at start.
    check_embedded(Settings(dashboard_listen="127.0.0.1:0"))
    for extra in ({"auth_tokens_file": "tokens.json"}, {"tls_cert_file": "cert.pem"}):
        with pytest.raises(ValueError, match="broker dashboard --target"):
            check_embedded(Settings(dashboard_listen="127.0.0.1:0", **extra))  # type: ignore[arg-type]
