"""Bad input gets its status code and a machine-readable reason, and nothing is sent."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from broker.app import BrokerApp
from broker.simulator import Simulator
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc
from tests.helpers import paired_session

SID = "962302"


def _reason(err: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "every error must carry rich details"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "broker.v1"
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the status details")


@pytest.mark.parametrize(
    ("request_kwargs", "timeout", "code", "reason"),
    [
        ({"session_id": "nope"}, 5, grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
        ({"session_id": "bad id!"}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"session_id": ""}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"session_id": "x" * 200}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"body": ""}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"body": "x" * (64 * 1024 + 1)}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"to": ""}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"to": "   "}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({"idempotency_key": "k" * 500}, 5, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ({}, 10 * 365 * 86400, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ],
    ids=["unknown-session", "malformed-id", "empty-id", "long-id", "empty-body", "huge-body",
         "no-recipient", "blank-recipient", "long-key", "ten-year-deadline"],
)
async def test_send_rejects_bad_input(
    sim: Simulator, broker: BrokerApp, request_kwargs: dict[str, str], timeout: float,
    code: grpc.StatusCode, reason: str,
) -> None:
    await paired_session(broker, sim, SID)
    fields: dict[str, Any] = {"session_id": SID, "to": "+15550100", "body": "hello"}
    fields |= request_kwargs
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Send(pb.SendRequest(**fields), timeout=timeout)
    assert err.value.code() == code
    assert _reason(err.value) == reason
    assert sim.record(SID).accepted == []
    assert broker.manager is not None
    assert await broker.manager.store.outbox_depth(SID) == 0


async def test_expired_deadline_sends_nothing(sim: Simulator, broker: BrokerApp) -> None:
    await paired_session(broker, sim, SID)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Send(pb.SendRequest(session_id=SID, to="+1", body="x"), timeout=1e-6)
    # Whichever side notices first: the client's clock or the broker's check.
    assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.INVALID_ARGUMENT)
    assert sim.record(SID).accepted == []
    assert broker.manager is not None
    assert await broker.manager.store.outbox_depth(SID) == 0


async def test_admin_calls_validate_too(sim: Simulator, broker: BrokerApp) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        stub = pb_grpc.BrokerStub(channel)
        calls: list[tuple[Awaitable[Any], grpc.StatusCode]] = [
            (stub.GetSession(pb.GetSessionRequest(session_id="ghost")), grpc.StatusCode.NOT_FOUND),
            (stub.CreateSession(pb.CreateSessionRequest(session_id="../etc")),
             grpc.StatusCode.INVALID_ARGUMENT),
            (stub.GetQr(pb.SessionRef(session_id="ghost")), grpc.StatusCode.NOT_FOUND),
            (stub.Health(pb.HealthRequest(session_ids=["ghost"])), grpc.StatusCode.NOT_FOUND),
        ]
        for call, code in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == code
        await stub.CreateSession(pb.CreateSessionRequest(session_id="a1", tenant="t1"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateSession(pb.CreateSessionRequest(session_id="a1", tenant="t2"))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StreamStatus(pb.StreamStatusRequest(session_ids=["ghost"])).read()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
