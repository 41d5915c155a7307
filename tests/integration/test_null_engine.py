"""The bench-only null engine (`null://`): sessions open at once with no socket,
sends are acked, keep-alives answered, and a stop closes the link."""

from __future__ import annotations

from broker.app import BrokerApp
from broker.config import Settings
from broker.lifecycle.states import State
from tests.helpers import wait_state


async def test_a_null_session_opens_at_once_acks_sends_and_stops() -> None:
    app = BrokerApp(Settings(listen="127.0.0.1:0", upstream_url="null://",
                             ack_timeout_s=1.0))
    await app.start()
    try:
        manager = app.manager
        assert manager is not None
        await manager.create("n1")
        await wait_state(app, "n1", State.OPEN)
        actor = manager.actors["n1"]
        assert actor.has_credentials  # paired on its first connect
        outcome = await manager.send("n1", "+100", "hi", idempotency_key="k1", timeout=5)
        assert outcome.result is not None and not outcome.duplicate
        await manager.stop("n1")
        await wait_state(app, "n1", State.STOPPED)
    finally:
        await app.stop()
