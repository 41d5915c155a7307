"""Webhook notifications from a real broker to a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.ops.webhooks import load_targets, parse_targets
from broker.simulator import Simulator
from broker.store.base import StatusEvent
from broker.store.crypto import generate_key
from tests.conftest import BrokerFactory
from tests.helpers import eventually, paired_session, wait_state
from tests.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)

SECRET = "whsec-test-0123456789"


@dataclass
class Hit:
    headers: dict[str, str]
    body: bytes
    status: int
    peer: tuple[str, int]
    """The client's address and port: the same port means a reused connection."""
    path: str = "/hooks/broker"

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


HANG = 0
"""A scripted "status" that answers nothing until the test ends (the sender times out)."""


@dataclass
class Receiver:
    """A real aiohttp server that records every POST and answers scripted statuses."""

    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    #: Statuses to answer for notifications of a given type, in order; then 200.
    script: dict[str, list[int]] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def of_type(self, kind: str) -> list[Hit]:
        return [h for h in self.hits if h.json.get("type") == kind]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        kind = json.loads(body).get("type", "")
        planned = self.script.get(kind)
        status = planned.pop(0) if planned else 200
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.hits.append(Hit({k.lower(): v for k, v in request.headers.items()}, body, status,
                             tuple(peer[:2]) if peer else ("", 0), request.path))
        if status == HANG:
            await self.released.wait()
            status = 200
        headers = {"Location": "/elsewhere"} if 300 <= status < 400 else None
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/broker", rec.handle)
    app.router.add_route("*", "/elsewhere", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hooks/broker"
    try:
        yield rec
    finally:
        rec.released.set()
        await runner.cleanup()


def hooks_file(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "webhooks.json"
    path.write_text(json.dumps(config))
    return str(path)


async def broker_with_hooks(make_broker: BrokerFactory, tmp_path: Path,
                            config: dict[str, Any], timeout_s: float = 5.0) -> BrokerApp:
    return await make_broker(webhooks_file=hooks_file(tmp_path, config),
                             webhook_backoff_initial_s=0.01, webhook_backoff_max_s=0.05,
                             webhook_max_attempts=5, webhook_timeout_s=timeout_s)


def assert_signed(hit: Hit, secret: str = SECRET) -> None:
    """Verify as a receiver would: HMAC-SHA256 over "<timestamp>.<body>"."""
    timestamp = hit.headers["x-broker-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + hit.body,
                        hashlib.sha256).hexdigest()
    assert hit.headers["x-broker-signature"] == f"sha256={expected}"
    assert hit.headers["content-type"] == "application/json"
    assert int(timestamp) > 0


async def test_logout_notifies_with_a_signed_body(make_broker: BrokerFactory, sim: Simulator,
                                                 receiver: Receiver, tmp_path: Path) -> None:
    app = await broker_with_hooks(make_broker, tmp_path,
                                  {"acme": {"url": receiver.url, "secret": SECRET}})
    await paired_session(app, sim, "w1", "acme")
    await sim.logout("w1")
    await wait_state(app, "w1", State.LOGGED_OUT)
    await eventually(lambda: bool(receiver.of_type("session.logged_out")), 10.0,
                     "the logged_out webhook")

    hit = receiver.of_type("session.logged_out")[0]
    assert_signed(hit)
    body = hit.json
    assert body["session_id"] == "w1"
    assert body["tenant"] == "acme"
    assert body["state"] == "LOGGED_OUT"
    assert body["code"] == 401
    assert body["reason"]
    assert body["event_id"] and hit.headers["x-broker-event-id"] == body["event_id"]
    assert body["timestamp"].endswith("Z")
    assert "broker qr w1" in body["recommendation"]
    assert hit.headers["user-agent"] == "session-broker-webhooks/1"
    # Pairing needed a person too: that was notified when the session asked for a scan.
    pairing = receiver.of_type("session.pairing_required")
    assert pairing and pairing[0].json["state"] == "PAIRING"
    assert_signed(pairing[0])
    assert SECRET.encode() not in hit.body
    # One HTTP session per notifier: the second post reused the first one's connection.
    assert pairing[0].peer == hit.peer


async def test_a_redirect_is_not_followed_and_a_hung_receiver_times_out(
    make_broker: BrokerFactory, sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """A 3xx is a failed attempt (never followed to a URL nobody configured); an attempt that
    gets no answer within --webhook-timeout is abandoned and retried."""
    receiver.script["session.pairing_required"] = [307]
    receiver.script["session.logged_out"] = [HANG]
    app = await broker_with_hooks(make_broker, tmp_path,
                                  {"*": {"url": receiver.url, "secret": SECRET}}, timeout_s=0.3)
    await paired_session(app, sim, "w5", "acme")
    await sim.logout("w5")
    await eventually(lambda: len(receiver.of_type("session.logged_out")) >= 2, 10.0,
                     "the logged_out webhook retried after a timeout")
    assert app.webhooks is not None
    await eventually(lambda: app.webhooks is not None and app.webhooks.delivered >= 2, 10.0,
                     "both notifications delivered")
    assert [h.status for h in receiver.of_type("session.pairing_required")] == [307, 200]
    assert {h.path for h in receiver.hits} == {"/hooks/broker"}  # the redirect not followed
    assert app.webhooks.given_up == 0


async def test_a_failed_delivery_is_retried(make_broker: BrokerFactory, sim: Simulator,
                                            receiver: Receiver, tmp_path: Path) -> None:
    receiver.script["session.logged_out"] = [500]
    app = await broker_with_hooks(make_broker, tmp_path,
                                  {"*": {"url": receiver.url, "secret": SECRET}})
    await paired_session(app, sim, "w2", "acme")
    await sim.logout("w2")
    await eventually(lambda: len(receiver.of_type("session.logged_out")) >= 2, 10.0,
                     "the retried logged_out webhook")
    first, second = receiver.of_type("session.logged_out")[:2]
    assert (first.status, second.status) == (500, 200)
    assert first.json == second.json  # the same notification, same event_id
    assert_signed(first)
    assert_signed(second)
    assert app.webhooks is not None
    await eventually(lambda: app.webhooks is not None and app.webhooks.delivered >= 2, 10.0,
                     "delivery to be recorded")
    assert app.webhooks.given_up == 0


async def test_only_the_owner_notifies_and_tenants_route(
    make_broker: BrokerFactory, sim: Simulator, receiver: Receiver, tmp_path: Path
) -> None:
    """Events of sessions owned elsewhere (seen on the bus with Redis) send nothing;
    tenants without a target and without "*" send nothing."""
    app = await broker_with_hooks(make_broker, tmp_path,
                                  {"acme": {"url": receiver.url, "secret": SECRET}})
    assert app.manager is not None
    foreign = StatusEvent(session_id="elsewhere", tenant="acme", sequence=1,
                          state=State.LOGGED_OUT, previous=State.OPEN, reason="logged out",
                          code=401, event_id="1-0")
    app.manager.bus.publish(foreign)
    await app.manager.create("other-tenant", "globex")  # PAIRING, but no target for globex
    await wait_state(app, "other-tenant", State.PAIRING)
    await app.manager.create("w3", "acme")  # processed after the two above
    await eventually(lambda: bool(receiver.of_type("session.pairing_required")), 10.0,
                     "w3's pairing webhook")
    assert [h.json["session_id"] for h in receiver.hits] == ["w3"]


@pytest.mark.redis
async def test_with_redis_only_the_owning_instance_notifies(
    make_broker: BrokerFactory, sim: Simulator, receiver: Receiver, tmp_path: Path,
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    """Both instances see every event through the shared log; one POST per event."""
    monkeypatch.setenv("BROKER_CREDENTIAL_KEYS", "k1:" + generate_key())
    config = {"*": {"url": receiver.url, "secret": SECRET}}
    apps = [await make_broker(store_url=redis_server.url, lease_ttl_s=2.0,
                              webhooks_file=hooks_file(tmp_path, config),
                              webhook_backoff_initial_s=0.01, webhook_backoff_max_s=0.05)
            for _ in range(2)]
    assert apps[0].manager is not None
    await apps[0].manager.create("w4", "acme")

    def owner() -> BrokerApp | None:
        return next((a for a in apps if a.manager and "w4" in a.manager.actors), None)

    await eventually(lambda: owner() is not None, 15.0, "an instance to own w4")
    app = owner()
    assert app is not None
    await wait_state(app, "w4", State.PAIRING)
    assert await sim.scan("w4")
    await wait_state(app, "w4", State.OPEN)
    await sim.logout("w4")
    await wait_state(app, "w4", State.LOGGED_OUT)
    await eventually(lambda: bool(receiver.of_type("session.logged_out")), 10.0,
                     "the logged_out webhook")
    other = next(a for a in apps if a is not app)
    assert app.webhooks is not None and other.webhooks is not None
    # The other instance has seen every event the owner has, and took on none.
    await eventually(lambda: app.webhooks is not None and other.webhooks is not None
                     and other.webhooks.observed >= app.webhooks.observed, 10.0,
                     "the other instance to see the same events")
    assert other.webhooks.scheduled == 0
    assert app.webhooks.scheduled == 2  # pairing, logout
    assert [h.json["type"] for h in receiver.hits] == ["session.pairing_required",
                                                       "session.logged_out"]


def test_config_is_validated_without_leaking_secrets(tmp_path: Path) -> None:
    targets = parse_targets({"*": {"url": "https://hooks.example/t/abc", "secret": "s3cret"}})
    assert "s3cret" not in repr(targets)
    assert targets["*"].safe_url == "https://hooks.example"
    with pytest.raises(ValueError, match="url"):
        parse_targets({"acme": {"url": "ftp://x", "secret": "s3cret"}})
    with pytest.raises(ValueError, match="secret"):
        parse_targets({"acme": {"url": "http://x"}})
    bad = tmp_path / "bad.json"
    bad.write_text('{"acme": {"url": "http://x", "secret": "s3cret",')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_targets(str(bad))
    assert "s3cret" not in str(info.value)
