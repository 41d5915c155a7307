"""Prometheus metrics scraped over HTTP from a real broker as sessions live their lives.

Assertions are on counter deltas and gauge values, never on timings.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from broker_client import BrokerClient, SessionNotFound
from tests.conftest import BrokerFactory
from tests.helpers import FAST_POLICY, paired_session, wait_state

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(app: BrokerApp) -> Samples:
    """GET /metrics over loopback and parse the exposition text."""
    assert app.metrics is not None
    host, port = app.metrics.address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5.0)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(app: BrokerApp, check: object, what: str, timeout: float = 10.0) -> Samples:
    """Scrape until check(samples) holds; bounded."""
    assert callable(check)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(app)
        if check(samples):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def app(make_broker: BrokerFactory) -> BrokerApp:
    return await make_broker(metrics_listen="127.0.0.1:0")


async def test_metrics_follow_connects_drops_and_sends(app: BrokerApp, sim: Simulator) -> None:
    before = await scrape(app)
    assert value(before, "broker_sessions", state="OPEN") == 0

    await paired_session(app, sim, "m1", "acme")
    s = await until(app, lambda s: value(s, "broker_connects_total")
                    == value(before, "broker_connects_total") + 1, "a connect")
    assert value(s, "broker_sessions", state="OPEN") == 1

    # The network drops the session: one disconnect with code 428, one reconnect.
    reconnects = value(s, "broker_reconnect_seconds_count")
    assert await sim.drop("m1")
    s = await until(app, lambda s: value(s, "broker_connects_total")
                    == value(before, "broker_connects_total") + 2, "the reconnect")
    assert value(s, "broker_disconnects_total", code="428") \
        == value(before, "broker_disconnects_total", code="428") + 1
    assert value(s, "broker_reconnect_seconds_count") == reconnects + 1
    assert value(s, "broker_sessions", state="OPEN") == 1

    async with BrokerClient(app.address, coalesce=False) as client:  # unary Send
        sent = await client.send("m1", "+15550100", "hello", idempotency_key="k1")
        assert sent.acked
        with pytest.raises(SessionNotFound):
            await client.send("nope", "+15550100", "hello", idempotency_key="k2")
        # Acks lost upstream: a no-wait Send is queued and waits in the outbox.
        sim.set_faults(lose_acks=1.0)
        queued = await client.send("m1", "+15550100", "later", idempotency_key="k3", wait=False)
        assert not queued.acked

    s = await scrape(app)
    assert value(s, "broker_sends_total", outcome="acked") \
        == value(before, "broker_sends_total", outcome="acked") + 1
    assert value(s, "broker_sends_total", outcome="queued") \
        == value(before, "broker_sends_total", outcome="queued") + 1
    assert value(s, "broker_sends_total", outcome="SESSION_NOT_FOUND") \
        == value(before, "broker_sends_total", outcome="SESSION_NOT_FOUND") + 1
    send_ok = "broker_rpc_duration_seconds_count"
    assert value(s, send_ok, method="broker.v1.Broker/Send", code="OK") \
        == value(before, send_ok, method="broker.v1.Broker/Send", code="OK") + 2
    assert value(s, send_ok, method="broker.v1.Broker/Send", code="NOT_FOUND") \
        == value(before, send_ok, method="broker.v1.Broker/Send", code="NOT_FOUND") + 1
    assert value(s, "broker_outbox_depth", session_id="m1", tenant="acme") == 1
    assert value(s, "broker_outbox_depth_total") == 1

    # The same outcomes on SendStream (the clients' default) count the same way.
    async with BrokerClient(app.address) as client:
        await client.send("m1", "+15550100", "streamed", idempotency_key="k4", wait=False)
        with pytest.raises(SessionNotFound):
            await client.send("nope", "+15550100", "hello", idempotency_key="k5")
    streamed = await scrape(app)
    assert value(streamed, "broker_sends_total", outcome="queued") \
        == value(s, "broker_sends_total", outcome="queued") + 1
    assert value(streamed, "broker_sends_total", outcome="SESSION_NOT_FOUND") \
        == value(s, "broker_sends_total", outcome="SESSION_NOT_FOUND") + 1

    # Acks flow again: the resend is acked and the outbox drains.
    sim.set_faults()
    s = await until(app, lambda s: value(s, "broker_outbox_depth", session_id="m1",
                                         tenant="acme") == 0, "the outbox to drain")
    assert value(s, "broker_outbox_depth_total") == 0


async def test_status_subscribers_are_counted(app: BrokerApp, sim: Simulator) -> None:
    await paired_session(app, sim, "m2")
    gauge = "broker_stream_subscribers"
    method = "broker.v1.Broker/StreamStatus"
    assert value(await scrape(app), gauge, method=method) == 0
    async with BrokerClient(app.address) as client:
        got_snapshot = asyncio.Event()

        async def watch() -> None:
            async for _ in client.watch_status(["m2"]):
                got_snapshot.set()

        task = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(got_snapshot.wait(), 10.0)
            await until(app, lambda s: value(s, gauge, method=method) == 1, "one subscriber")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await until(app, lambda s: value(s, gauge, method=method) == 0, "no subscribers")


async def test_keepalives_and_logged_out_sessions(make_broker: BrokerFactory,
                                                  sim: Simulator) -> None:
    app = await make_broker(replace(FAST_POLICY, keepalive_interval_s=0.05,
                                    keepalive_timeout_s=2.0),
                            metrics_listen="127.0.0.1:0")
    await paired_session(app, sim, "m3")
    await until(app, lambda s: value(s, "broker_keepalives_total", result="ok") >= 2,
                "answered keep-alives")
    await sim.logout("m3")
    await wait_state(app, "m3", State.LOGGED_OUT)
    s = await until(app, lambda s: value(s, "broker_disconnects_total", code="401") == 1,
                    "the logout disconnect")
    assert value(s, "broker_sessions", state="LOGGED_OUT") == 1
    assert value(s, "broker_sessions", state="OPEN") == 0
    assert value(s, "broker_keepalives_total", result="missed") == 0


async def test_a_missed_pong_is_counted(make_broker: BrokerFactory, sim: Simulator) -> None:
    app = await make_broker(replace(FAST_POLICY, keepalive_interval_s=0.05,
                                    keepalive_timeout_s=0.5),
                            metrics_listen="127.0.0.1:0")
    await paired_session(app, sim, "m4")
    await until(app, lambda s: value(s, "broker_keepalives_total", result="ok") >= 1,
                "an answered keep-alive")
    sim.set_faults(latency_ms=5000)  # pongs now come back long after the timeout
    try:
        s = await until(app, lambda s: value(s, "broker_keepalives_total", result="missed") >= 1,
                        "a missed keep-alive")
        assert value(s, "broker_disconnects_total", code="408") >= 1
    finally:
        sim.set_faults()


async def test_metrics_are_off_by_default(make_broker: BrokerFactory) -> None:
    app = await make_broker()
    assert app.metrics is None


async def test_availability_gaps_attempts_and_storm_holds_per_session(
        make_broker: BrokerFactory, sim: Simulator) -> None:
    # A budget of 3 at once, then one a minute: the drops below exhaust it.
    app = await make_broker(replace(FAST_POLICY, attempt_burst=3, attempt_rate_per_min=1.0),
                            metrics_listen="127.0.0.1:0")
    await paired_session(app, sim, "m5", "acme")  # pairing and restart: 2 attempts
    key = {"session_id": "m5", "tenant": "acme"}
    s = await until(app, lambda s: value(s, "broker_connect_attempts_total") == 2,
                    "the pairing attempts")
    assert value(s, "broker_session_availability", **key) == 1.0
    assert value(s, "broker_session_connect_attempts_per_minute", **key) == 2.0
    assert ("broker_session_reconnect_gap_seconds", frozenset(
        {**key, "quantile": "1"}.items())) not in s  # no reconnect yet

    assert await sim.drop("m5")  # the third attempt: still within the burst
    await until(app, lambda s: value(s, "broker_connects_total") == 2, "the reconnect")
    assert await sim.drop("m5")  # the fourth must wait for the budget
    s = await until(app, lambda s: value(s, "broker_connect_attempts_held_back_total") == 1,
                    "an attempt held back")
    assert value(s, "broker_sessions", state="RECONNECTING") == 1
    assert value(s, "broker_connect_attempts_total") == 3
    assert 0 < value(s, "broker_session_availability", **key) < 1
    gaps = {q: value(s, "broker_session_reconnect_gap_seconds", **key, quantile=q)
            for q in ("0.5", "0.99", "1")}
    assert 0 < gaps["0.5"] <= gaps["0.99"] <= gaps["1"]
