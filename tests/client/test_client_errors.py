"""error_from_rpc decodes rich statuses; admin calls raise typed errors, never raw grpc ones."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from tenacity import RetryCallState
from tenacity.wait import wait_fixed

from broker_client import (
    AlreadyExists,
    BrokerClient,
    BrokerError,
    LoggedOut,
    NotDeliveredYet,
    PermissionDenied,
    SessionNotFound,
    Unauthenticated,
    error_from_rpc,
)
from broker_client.errors import _decode_details
from broker_client.retry import send_retrying, wait_retry_info
from broker_client.v1 import broker_pb2

from .fake_broker import PlainStatus, ScriptedBroker, rich_status

BOUND = 20.0


async def test_admin_calls_round_trip(broker: ScriptedBroker, client: BrokerClient) -> None:
    created = await client.create_session("s1", "acme", start=False)
    assert created.state == broker_pb2.STOPPED and created.tenant == "acme"
    assert (await client.get_session("s1")).session_id == "s1"
    assert [s.tenant for s in await client.list_sessions("acme")] == ["acme"]
    assert (await client.stop_session("s1")).state == broker_pb2.STOPPED
    assert (await client.logout_session("s1")).state == broker_pb2.LOGGED_OUT
    assert (await client.restart_session("s1")).state == broker_pb2.CONNECTING
    await client.delete_session("s1")
    assert (await client.get_qr("s1")).qr == "QR"
    [health] = await client.health(["s1"])
    assert health.healthy and health.session.session_id == "s1"


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", SessionNotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, "LOGGED_OUT", LoggedOut),
        (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", AlreadyExists),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", PermissionDenied),
    ],
)
async def test_admin_errors_are_typed(
    broker: ScriptedBroker,
    client: BrokerClient,
    code: grpc.StatusCode,
    reason: str,
    expected: type[BrokerError],
) -> None:
    broker.unary_error = rich_status(code, reason, metadata={"session_id": "s9"})
    with pytest.raises(expected) as info:
        await asyncio.wait_for(client.get_session("s9"), BOUND)
    assert info.value.reason == reason
    assert info.value.session_id == "s9"
    assert len(broker.metadata) == 1  # not retried


async def test_error_without_details_maps_by_code(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    broker.unary_error = PlainStatus(grpc.StatusCode.NOT_FOUND, "no such session")
    with pytest.raises(SessionNotFound) as info:
        await asyncio.wait_for(client.get_session("s1"), BOUND)
    assert info.value.reason == "" and info.value.metadata == {}
    assert info.value.message == "no such session" and info.value.session_id is None
    assert info.value.retry_after is None


async def test_reason_cannot_change_the_code_class(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    # NOT_DELIVERED_YET under INTERNAL must not become an (retryable) Unavailable.
    broker.send_default = rich_status(grpc.StatusCode.INTERNAL, "NOT_DELIVERED_YET")
    with pytest.raises(BrokerError) as info:
        await asyncio.wait_for(client.send("s1", "a", "b"), BOUND)
    assert type(info.value) is BrokerError
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert len(broker.send_requests) == 1


async def test_raw_rpc_error_decodes_outside_the_client(target: str) -> None:
    # error_from_rpc also serves code that calls the stubs directly.
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/broker.v1.Broker/NoSuchMethod",
            request_serializer=broker_pb2.SessionRef.SerializeToString,
            response_deserializer=broker_pb2.Session.FromString,
        )
        with pytest.raises(grpc.RpcError) as raw:
            await asyncio.wait_for(call(broker_pb2.SessionRef()), BOUND)
    err = error_from_rpc(raw.value)
    assert type(err) is BrokerError and err.code == grpc.StatusCode.UNIMPLEMENTED


def test_decode_details_prefers_broker_domain_and_reads_retry_info() -> None:
    foreign, ours, retry = any_pb2.Any(), any_pb2.Any(), any_pb2.Any()
    foreign.Pack(error_details_pb2.ErrorInfo(reason="OTHER", domain="proxy.example"))
    ours.Pack(
        error_details_pb2.ErrorInfo(
            reason="OUTBOX_FULL", domain="broker.v1", metadata={"session_id": "s1"}
        )
    )
    delay = duration_pb2.Duration()
    delay.FromTimedelta(timedelta(milliseconds=1500))
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))

    reason, metadata, retry_after = _decode_details([foreign, ours, retry])
    assert reason == "OUTBOX_FULL"
    assert metadata == {"session_id": "s1"}
    assert retry_after == pytest.approx(1.5)


def test_wait_prefers_retry_info_over_backoff() -> None:
    wait = wait_retry_info(wait_fixed(9))
    state = RetryCallState(send_retrying(attempts=3, budget=10), fn=None, args=(), kwargs={})
    state.set_exception(
        (NotDeliveredYet, NotDeliveredYet("x", retry_after=0.25), None)
    )
    assert wait(state) == pytest.approx(0.25)
    state.set_exception((NotDeliveredYet, NotDeliveredYet("x"), None))
    assert wait(state) == 9
