"""Client side of Receive/AckInbound against a scripted server: requests, reconnects, errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from broker_client import BrokerClient, InboundMessage, InboundReceiver, SessionNotFound

from .fake_broker import ScriptedBroker, rich_status

BOUND = 10.0


def _message(inbound_id: str) -> InboundMessage:
    return InboundMessage(session_id="s1", inbound_id=inbound_id, upstream_id=f"u{inbound_id}",
                          delivery_count=1)


async def _next(receiver: InboundReceiver) -> InboundMessage:
    return await asyncio.wait_for(receiver.__anext__(), BOUND)


async def test_request_fields_and_ack(broker: ScriptedBroker, client: BrokerClient) -> None:
    broker.receive_script = [([_message("1-0")], None)]
    receiver = client.receive(["s1", "s2"], group="billing", consumer="w1", max_unacked=5)
    got = await _next(receiver)
    await receiver.aclose()
    assert got.inbound_id == "1-0"
    request = broker.receive_requests[0]
    assert (list(request.session_ids), request.group, request.consumer, request.max_unacked) == (
        ["s1", "s2"], "billing", "w1", 5)
    assert await client.ack_inbound("s1", ["1-0", "2-0"], group="billing") == 2
    ack = broker.ack_requests[0]
    assert (ack.session_id, ack.group, list(ack.inbound_ids)) == ("s1", "billing", ["1-0", "2-0"])


async def test_reconnects_after_unavailable(broker: ScriptedBroker, client: BrokerClient) -> None:
    broker.receive_script = [
        ([_message("1-0")], rich_status(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE",
                                        retry_after=0.01)),
        ([_message("2-0")], None),
    ]
    receiver = client.receive(["s1"])
    assert [(await _next(receiver)).inbound_id for _ in range(2)] == ["1-0", "2-0"]
    assert receiver.reconnects == 1
    assert len(broker.receive_requests) == 2
    assert broker.receive_requests[1] == broker.receive_requests[0]  # nothing to resume
    await receiver.aclose()
    with pytest.raises(StopAsyncIteration):
        await receiver.__anext__()


async def test_other_errors_end_the_stream(broker: ScriptedBroker, client: BrokerClient) -> None:
    broker.receive_script = [([], rich_status(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"))]
    receiver = client.receive(["ghost"])
    with pytest.raises(SessionNotFound):
        await _next(receiver)
    assert len(broker.receive_requests) == 1
