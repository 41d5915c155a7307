"""Credentials sealed with a key the broker no longer has (rotated away, or a
wrong key under the same id) are a permanent FAILED with its own reason, not
a reconnect loop: the broker never dials the upstream with them, Health names
the key id, and a Send is refused with CREDENTIALS_UNREADABLE. Counted at the
simulator (connection attempts per login), on SQLite and on Redis.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.app import BrokerApp
from broker.config import Settings
from broker.lifecycle.states import CREDENTIALS_UNREADABLE_PREFIX, State
from broker.simulator import Simulator
from broker.store.base import Store
from broker.store.crypto import CredentialCipher
from broker.store.redis import RedisStore
from broker.store.sqlite import SqliteStore
from broker_client import BrokerClient, FailedPrecondition
from broker_client.v1 import broker_pb2 as pb
from tests.helpers import FAST_POLICY, eventually, paired_session, state_of
from tests.redis_server import RedisServer, shared_redis, shared_redis_server  # noqa: F401

SESSIONS = [f"ck{i}" for i in range(6)]
KEY_A = base64.b64decode("q0cHhN1fXo4yJm2Sx8wqYQ4wmS9nUo6kq2Vd0yQ1s3c=")
KEY_B = bytes(32)
WAIT_S = 20.0

CIPHERS: dict[str, Callable[[], CredentialCipher]] = {
    # The old key 'k1' was dropped from the configuration: only 'k2' is left.
    "rotated-away": lambda: CredentialCipher({"k2": KEY_B}, "k2"),
    # Someone configured a different key under the same id.
    "wrong-key": lambda: CredentialCipher({"k1": KEY_B}, "k1"),
}


@dataclass
class Stores:
    """Opens stores on one database or Redis, each with the cipher it is given."""

    kind: str
    tmp: Path
    redis: RedisServer | None

    def open(self, cipher: CredentialCipher) -> Store:
        if self.redis is not None:
            return RedisStore.from_url(self.redis.url, cipher=cipher)
        return SqliteStore(self.tmp / "broker.db", cipher=cipher)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    server = request.getfixturevalue("shared_redis") if request.param == "redis" else None
    return Stores(request.param, tmp_path, server)


@pytest.fixture
async def apps(sim: Simulator) -> AsyncIterator[Callable[[Store], BrokerApp]]:
    started: list[BrokerApp] = []

    def make(store: Store) -> BrokerApp:
        settings = Settings(listen="127.0.0.1:0", upstream_url=sim.url, lifecycle=FAST_POLICY,
                            ack_timeout_s=1.0, connect_timeout_s=2.0)
        app = BrokerApp(settings, store=store)
        started.append(app)
        return app

    yield make
    for app in reversed(started):
        await app.stop()


@pytest.mark.parametrize("cipher", list(CIPHERS))
async def test_undecryptable_credentials_fail_without_dialling(
    sim: Simulator, stores: Stores, apps: Callable[[Store], BrokerApp], cipher: str,
) -> None:
    first_store = stores.open(CredentialCipher({"k1": KEY_A}, "k1"))
    first = apps(first_store)
    await first.start()
    for sid in SESSIONS:
        await paired_session(first, sim, sid)
    await first.stop()
    await first_store.close()
    dialled = {sid: sim.record(sid).connection_attempts for sid in SESSIONS}

    second = apps(stores.open(CIPHERS[cipher]()))
    await second.start()
    await eventually(lambda: all(state_of(second, s) is State.FAILED for s in SESSIONS),
                     WAIT_S, "every session FAILED")

    assert {sid: sim.record(sid).connection_attempts for sid in SESSIONS} == dialled
    async with BrokerClient(second.address, retry_attempts=1) as client:
        health = {h.session.session_id: h for h in await client.health(SESSIONS)}
        for sid in SESSIONS:
            h = health[sid]
            assert h.session.state == pb.FAILED
            assert h.session.reason.startswith(CREDENTIALS_UNREADABLE_PREFIX), h.session
            advice = [r for r in h.recommendations if r.code == "CREDENTIALS_UNREADABLE"]
            assert advice and "'k1'" in advice[0].message, h.recommendations
            # Straight from CONNECTING to FAILED: no RECONNECTING on the way.
            assert pb.RECONNECTING not in [t.to_state for t in h.recent], h.recent
        with pytest.raises(FailedPrecondition) as refused:
            await client.send(SESSIONS[0], "+15550100", "hi", idempotency_key="x")
        assert refused.value.reason == "CREDENTIALS_UNREADABLE"
    assert {sid: sim.record(sid).connection_attempts for sid in SESSIONS} == dialled
