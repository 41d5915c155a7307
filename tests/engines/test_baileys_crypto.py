"""Real end-to-end crypto offline: Baileys' own signal repository for two logins,
their key stores backed by the broker's Redis store through the bridge. A
session is set up, messages are encrypted by one login and decrypted by the
other, the broker (and with it the bridge) is restarted, and the next message
still decrypts on the persisted keys. The raw Redis values hold no plaintext
key material."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from broker.backends import Backend, open_backend
from broker.config import Settings
from broker.engines.baileys import BaileysEngine
from broker.lifecycle.states import State
from broker.runtime.manager import SessionManager
from broker.store.kv import SessionKV
from tests.engines.baileys_support import FAKE_ENV, FakeWhatsApp, free_port, needs_bridge
from tests.helpers import FAST_POLICY, eventually
from tests.redis_server import RedisServer

pytestmark = needs_bridge

Broker = tuple[SessionManager, BaileysEngine, Backend]


@pytest.fixture
async def brokers(shared_redis_server: RedisServer, credential_env: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Callable[[], Awaitable[Broker]]]:
    monkeypatch.setenv(FAKE_ENV, f"127.0.0.1:{free_port()}")
    shared_redis_server.flushall()
    settings = Settings(store_url=shared_redis_server.url, lifecycle=FAST_POLICY,
                        ack_timeout_s=2.0, connect_timeout_s=5.0, instance_id="crypto")
    running: list[Broker] = []

    async def start() -> Broker:
        backend = open_backend(settings)
        engine = BaileysEngine()
        manager = SessionManager(backend.store, await engine.start(), settings,
                                 placement=backend.placement, limiter=backend.limiter)
        await manager.start()
        running.append((manager, engine, backend))
        return manager, engine, backend

    yield start
    for broker in running:
        await stop(broker)


async def stop(broker: Broker) -> None:
    """Stop a broker (once: the fixture stops the ones the test left running)."""
    manager, engine, backend = broker
    if engine.supervisor is None:
        return
    await manager.close()
    await engine.stop()
    engine.supervisor = None
    await backend.store.close()


def is_in(manager: SessionManager, sid: str, state: State) -> bool:
    actor = manager.actors.get(sid)
    return actor is not None and actor.state == state


async def wait_open(manager: SessionManager, sid: str) -> None:
    await eventually(functools.partial(is_in, manager, sid, State.OPEN), 20, f"{sid} OPEN")


async def inbound_bodies(manager: SessionManager, sid: str) -> list[str]:
    bodies: list[str] = []

    async def read() -> None:
        async for delivery in manager.inbound.receive([sid], group="crypto"):
            bodies.append(delivery.record.body)
            await manager.inbound.ack(sid, "crypto", [delivery.record.inbound_id])

    task = asyncio.create_task(read())
    try:
        await eventually(lambda: bool(bodies), 10, f"an inbound message on {sid}")
    finally:
        task.cancel()
    return bodies


async def test_messages_decrypt_across_a_broker_restart_on_keys_in_redis(
    brokers: Callable[[], Awaitable[Broker]], shared_redis_server: RedisServer
) -> None:
    fake = FakeWhatsApp(int(os.environ[FAKE_ENV].rsplit(":", 1)[1]))
    manager, engine, backend = await brokers()
    for sid, phone in (("alice", "15550001"), ("bob", "15550002")):
        await manager.create(sid)
        await eventually(functools.partial(is_in, manager, sid, State.PAIRING), 20,
                         f"{sid} PAIRING")
        assert (await fake.do("scan", session=sid, phone=phone))["ok"]
        await wait_open(manager, sid)

    first = await fake.do("e2e_send", **{"from": "alice"}, to="bob", id="E1", text="one")
    assert first == {"ok": True, "type": "pkmsg"}, first  # a new session from bob's pre-key
    assert await inbound_bodies(manager, "bob") == ["one"]
    reply = await fake.do("e2e_send", **{"from": "bob"}, to="alice", id="E2", text="reply")
    assert reply == {"ok": True, "type": "msg"}, reply
    assert await inbound_bodies(manager, "alice") == ["reply"]

    await stop((manager, engine, backend))  # the broker goes, its bridge with it
    manager, engine, backend = await brokers()
    for sid in ("alice", "bob"):
        await wait_open(manager, sid)  # on the stored creds: no pairing
    again = await fake.do("e2e_send", **{"from": "alice"}, to="bob", id="E3", text="two")
    assert again == {"ok": True, "type": "msg"}, again  # the persisted ratchet, not a new one
    assert await inbound_bodies(manager, "bob") == ["two"]

    # Raw Redis: every value of both areas is sealed; decrypted, they are key material.
    raw = aioredis.Redis.from_url(shared_redis_server.url)
    try:
        for sid in ("alice", "bob"):
            values = await raw.hgetall(f"broker:{{s:{sid}}}:kv")
            names = sorted(k.decode() if isinstance(k, bytes) else k for k in values)
            assert "creds" in names and any(n.startswith("session:") for n in names), names
            opened = await SessionKV(backend.store, sid, None).get(names)
            assert b'"private"' in opened["creds"] and b"Buffer" in opened["creds"]
            for name, value in values.items():
                for marker in (b"Buffer", b"private", b"public", b"noiseKey", b"15550001"):
                    assert marker not in value, (sid, name, marker)
    finally:
        await raw.aclose()
