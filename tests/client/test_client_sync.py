"""SyncBrokerClient: the same behaviour, blocking, driven from a worker thread.

The scripted server runs on the test's event loop, so the blocking calls run
in a thread (asyncio.to_thread) to keep that loop serving.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker_client import NeedsPairing, SyncBrokerClient, Unavailable
from broker_client.v1 import broker_pb2

from .fake_broker import HANG, ScriptedBroker, StreamStep, event, not_delivered, rich_status

BOUND = 20.0


async def test_sync_send_retries_and_raises_typed(target: str, broker: ScriptedBroker) -> None:
    broker.send_script = [
        not_delivered(),
        None,
        rich_status(
            grpc.StatusCode.FAILED_PRECONDITION, "NEEDS_PAIRING", metadata={"session_id": "s1"}
        ),
    ]

    def work() -> tuple[str, NeedsPairing]:
        with SyncBrokerClient(target, token="tok") as client:
            result = client.send("s1", "alice", "hi")
            with pytest.raises(NeedsPairing) as info:
                client.send("s1", "alice", "again")
            assert client.get_session("s1").session_id == "s1"
            return result.message_id, info.value

    message_id, err = await asyncio.wait_for(asyncio.to_thread(work), BOUND)
    first, second, third = broker.send_requests
    assert first.idempotency_key == second.idempotency_key != third.idempotency_key
    assert message_id == f"msg-{first.idempotency_key}"
    assert err.reason == "NEEDS_PAIRING" and err.session_id == "s1"
    assert all(m["authorization"] == "Bearer tok" for m in broker.metadata)


async def test_sync_watch_status_resumes(target: str, broker: ScriptedBroker) -> None:
    broker.stream_script = [
        StreamStep([event("e1")], rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")),
        StreamStep([event("e2")], HANG),
    ]

    def work() -> tuple[list[broker_pb2.StatusEvent], str, int]:
        with SyncBrokerClient(target) as client, client.watch_status(["s1"]) as watch:
            events = [next(watch), next(watch)]
            return events, watch.last_event_id, watch.reconnects

    events, last, reconnects = await asyncio.wait_for(asyncio.to_thread(work), BOUND)
    assert [e.event_id for e in events] == ["e1", "e2"]
    assert last == "e2" and reconnects == 1
    assert [r.resume_after for r in broker.stream_requests] == ["", "e1"]


async def test_sync_close_is_idempotent_and_final(dead_target: str) -> None:
    def work() -> None:
        client = SyncBrokerClient(dead_target, retry_attempts=2)
        with pytest.raises(Unavailable):
            client.send("s1", "a", "b", timeout=BOUND / 2)
        client.close()
        client.close()
        with pytest.raises(RuntimeError):
            client.list_sessions()

    await asyncio.wait_for(asyncio.to_thread(work), BOUND)
