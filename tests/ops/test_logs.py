"""Structured logs: JSON per line, session lines carry session_id and tenant, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.logs import JsonFormatter
from broker.simulator import Simulator
from broker_client import BrokerClient
from tests.conftest import BrokerFactory
from tests.helpers import eventually, paired_session

SID = "logs-962302"
TENANT = "acme"
HOOK_SECRET = "whsec-never-log-me"
HOOK_PATH_TOKEN = "T0KEN-in-the-url-path"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record of the process as `--log-format json --log-level debug` writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    websockets = logging.getLogger("websockets")
    saved = root.level, websockets.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    websockets.setLevel(logging.WARNING)  # as broker.logs.setup does
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        websockets.setLevel(saved[1])


async def test_pairing_and_send_logs(captured: io.StringIO, make_broker: BrokerFactory,
                                     sim: Simulator, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks.json"
    # Nobody listens there: the webhook fails and its retries are logged too.
    hooks.write_text(json.dumps({"*": {"url": f"http://127.0.0.1:9/{HOOK_PATH_TOKEN}",
                                       "secret": HOOK_SECRET}}))
    app = await make_broker(webhooks_file=str(hooks), webhook_backoff_initial_s=0.01,
                            webhook_backoff_max_s=0.02, webhook_max_attempts=2,
                            metrics_listen="127.0.0.1:0")
    assert app.manager is not None
    await paired_session(app, sim, SID, TENANT)
    async with BrokerClient(app.address) as client:
        assert (await client.send(SID, "+15550100", "hello", idempotency_key="k1")).acked
    assert app.webhooks is not None
    await eventually(lambda: app.webhooks is not None and app.webhooks.given_up >= 1, 10.0,
                     "the webhook to give up")
    credentials = await app.manager.store.load_credentials(SID)
    assert credentials is not None and credentials.get("token")
    token = str(credentials["token"])

    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    about = [e for e in lines if SID in e["msg"]]
    assert any("->" in e["msg"] for e in about), "state transitions are logged"
    assert any("webhook" in e["msg"] for e in about), "webhook attempts are logged"
    for entry in about:
        assert entry.get("session_id") == SID, entry
        assert entry.get("tenant") == TENANT, entry
    for secret in (token, HOOK_SECRET, HOOK_PATH_TOKEN):
        assert secret not in text
