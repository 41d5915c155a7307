"""Fixtures for scale-out tests: a real redis-server and broker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store.crypto import generate_key
from tests.cluster.procs import BrokerProcess, ProcessFactory
from tests.redis_server import redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis


@pytest.fixture
def credential_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    value = "k1:" + generate_key()
    monkeypatch.setenv("BROKER_CREDENTIAL_KEYS", value)
    return {"BROKER_CREDENTIAL_KEYS": value}


@pytest.fixture
def broker_processes(tmp_path: Path, credential_env: dict[str, str]) -> Iterator[ProcessFactory]:
    procs: list[BrokerProcess] = []

    def factory(name: str, store_url: str, upstream_url: str, *extra: str) -> BrokerProcess:
        proc = BrokerProcess(name, store_url, upstream_url, tmp_path, credential_env, extra)
        proc.start()
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.close()
