"""BrokerServicer in-process: status codes, rich error details and conversion.

No server, no sockets, no upstream: a real SessionManager over the memory
store (sessions are created unstarted, so nothing connects). Unary methods are
invoked through grpcio-testing by method descriptor, with deadlines, and their
code, details and trailing metadata read as a client would (tests/api/aio_testing.py
bridges its threads to the asyncio servicer); StreamStatus, whose tests
interleave the stream with publishing events, is called with a fake context.
The real-server tests in tests/integration keep covering behaviour end to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, cast

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from broker.api import convert
from broker.api.servicer import BrokerServicer
from broker.config import Settings
from broker.lifecycle.states import State
from broker.runtime.manager import SessionManager
from broker.runtime.watch import Origin, Watched
from broker.store.base import StatusEvent
from broker.store.memory import MemoryStore
from broker.upstream.provider import Link
from broker_client.v1 import broker_pb2 as pb
from tests.api import aio_testing

SID = "962302"


class FakeContext:
    """The part of grpc.aio.ServicerContext the broker's handlers use."""

    def __init__(self, time_remaining: float | None = None) -> None:
        self._time_remaining = time_remaining
        self.status: grpc.Status | None = None

    def time_remaining(self) -> float | None:
        return self._time_remaining

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.status = status
        raise grpc.aio.AbortError()  # what grpc.aio raises to end the call


@dataclass
class Failure:
    """A call's final status as a client decodes it."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_after_s: float | None = None


def _failure(status: grpc.Status) -> Failure:
    out = Failure(status.code, status.details)
    for key, value in status.trailing_metadata:
        if key != "grpc-status-details-bin":
            continue
        rich = status_pb2.Status.FromString(cast(bytes, value))
        assert rich.code == status.code.value[0] and rich.message == status.details
        for packed in rich.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if packed.Unpack(info):
                out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
            elif packed.Unpack(retry):
                out.retry_after_s = retry.retry_delay.ToTimedelta().total_seconds()
    return out


class Rpcs:
    """The servicer's unary methods called through grpcio-testing, by name."""

    def __init__(self, servicer: BrokerServicer) -> None:
        self._rpcs = aio_testing.Rpcs(pb.DESCRIPTOR.services_by_name["Broker"], servicer)

    async def call(self, method: str, request: Message, *, timeout: float | None = None) -> Any:
        """A call that must succeed: its response."""
        response, _, code, details = await self._rpcs.unary(method, request, timeout=timeout)
        assert code == grpc.StatusCode.OK, (code, details)
        return response

    async def fails(self, method: str, request: Message, *,
                    timeout: float | None = None) -> Failure:
        """A call that must fail: its status, decoded as a client would."""
        response, trailing, code, details = await self._rpcs.unary(method, request,
                                                                   timeout=timeout)
        assert code != grpc.StatusCode.OK and response is None
        return _failure(grpc_status(code, details, trailing))


def grpc_status(code: grpc.StatusCode, details: str, trailing: Any) -> grpc.Status:
    return cast(grpc.Status, aio_testing.Status(code, details, tuple(trailing)))


async def read(stream: AsyncIterator[pb.StatusEvent], n: int) -> list[pb.StatusEvent]:
    return [await anext(stream) for _ in range(n)]


class NoUpstream:
    """Nothing here starts a session; a connect would be a test bug."""

    async def connect(self, login: str, credentials: dict[str, Any] | None,
                      kv: object = None) -> Link:
        raise AssertionError("the servicer tests never connect upstream")


@pytest.fixture
async def manager() -> AsyncIterator[SessionManager]:
    m = SessionManager(MemoryStore(), NoUpstream(), Settings())
    yield m
    await m.close()


@pytest.fixture
def servicer(manager: SessionManager) -> BrokerServicer:
    return BrokerServicer(manager)


@pytest.fixture
async def rpcs(servicer: BrokerServicer) -> Rpcs:
    return Rpcs(servicer)


def ctx(time_remaining: float | None = None) -> Any:
    return FakeContext(time_remaining)


# -- conversion ----------------------------------------------------------------


async def test_create_get_and_list_convert_sessions(rpcs: Rpcs) -> None:
    created = await rpcs.call(
        "CreateSession", pb.CreateSessionRequest(session_id=SID, tenant="acme", no_start=True))
    assert (created.session_id, created.tenant, created.state) == (SID, "acme", pb.STOPPED)
    assert not created.has_credentials and created.outbox_depth == 0
    assert created.HasField("updated_at")
    got = await rpcs.call("GetSession", pb.GetSessionRequest(session_id=SID))
    assert got == created
    await rpcs.call(
        "CreateSession",
        pb.CreateSessionRequest(session_id="other", tenant="globex", no_start=True))
    listed = await rpcs.call("ListSessions", pb.ListSessionsRequest(tenant="acme"))
    assert [s.session_id for s in listed.sessions] == [SID]


async def test_health_converts_counters_and_recommendations(rpcs: Rpcs) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    health = await rpcs.call("Health", pb.HealthRequest(session_ids=[SID]))
    (item,) = health.sessions
    assert item.session.session_id == SID and item.session.tenant == "default"
    assert item.live_state == pb.SESSION_STATE_UNSPECIFIED  # nobody owns it
    assert [(r.code, r.severity) for r in item.recommendations] == [("STOPPED", pb.INFO)]
    assert item.healthy  # stopped on purpose: worth saying, not a problem


def test_watched_events_carry_their_origin_as_flags() -> None:
    event = StatusEvent(SID, "default", 3, State.OPEN, State.CONNECTING, event_id="7-0", at=1.0)
    snapshot = convert.watched(Watched(event, Origin.SNAPSHOT))
    resync = convert.watched(Watched(event, Origin.RESYNC))
    replay = convert.watched(Watched(event, Origin.REPLAY))
    live = convert.watched(Watched(event, Origin.LIVE))
    assert (snapshot.snapshot, snapshot.resync) == (True, False)
    assert (resync.snapshot, resync.resync) == (True, True)
    assert (replay.snapshot, replay.resync) == (False, False)
    assert (live.snapshot, live.resync) == (False, False)
    assert (live.event_id, live.sequence, live.state, live.previous_state) == (
        "7-0", 3, pb.OPEN, pb.CONNECTING
    )
    # A live event goes to every stream: converted once, shared.
    assert convert.watched(Watched(event, Origin.LIVE)) is live


def test_send_keeps_a_margin_of_the_deadline_to_answer() -> None:
    assert convert.send_timeout(None) is None
    assert convert.send_timeout(10.0) == pytest.approx(9.95)
    assert convert.send_timeout(0.1) == pytest.approx(0.09)


# -- status codes and rich details ---------------------------------------------


async def test_unknown_session_is_not_found_with_its_id(rpcs: Rpcs) -> None:
    failure = await rpcs.fails("GetSession", pb.GetSessionRequest(session_id="x1"))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert (failure.reason, failure.domain) == ("SESSION_NOT_FOUND", "broker.v1")
    assert failure.metadata == {"session_id": "x1"}


@pytest.mark.parametrize(
    ("method", "request_", "field_name"),
    [
        ("GetSession", pb.GetSessionRequest(session_id="bad id"), "session_id"),
        ("Health", pb.HealthRequest(session_ids=["ok", ""]), "session_ids"),
        ("Health", pb.HealthRequest(tenant="a b"), "tenant"),
        ("ListSessions", pb.ListSessionsRequest(tenant="-x"), "tenant"),
        ("Send", pb.SendRequest(session_id=SID, to="", body="hi"), "to"),
        ("Send", pb.SendRequest(session_id=SID, to="+1", body=""), "body"),
        ("AckInbound", pb.AckInboundRequest(session_id=SID), "inbound_ids"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    rpcs: Rpcs, method: str, request_: Message, field_name: str,
) -> None:
    failure = await rpcs.fails(method, request_)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "INVALID_ARGUMENT"
    assert failure.metadata == {"field": field_name}
    assert failure.message.startswith(f"{field_name}: ")


async def test_a_deadline_too_short_to_wait_for_an_ack_is_invalid(rpcs: Rpcs) -> None:
    request = pb.SendRequest(session_id=SID, to="+1", body="hi")
    failure = await rpcs.fails("Send", request, timeout=0.005)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.metadata == {"field": "deadline"}


async def test_send_to_a_stopped_session_is_failed_precondition(rpcs: Rpcs) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    request = pb.SendRequest(session_id=SID, to="+1", body="hi", idempotency_key="k1")
    failure = await rpcs.fails("Send", request, timeout=5.0)
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "SESSION_STOPPED"
    assert failure.metadata == {"session_id": SID, "state": "STOPPED"}
    assert failure.retry_after_s is None


async def test_qr_of_a_session_not_pairing_is_failed_precondition(rpcs: Rpcs) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    failure = await rpcs.fails("GetQr", pb.SessionRef(session_id=SID))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.reason == "NOT_PAIRING"
    assert failure.metadata == {"session_id": SID, "state": "STOPPED"}


async def test_a_session_id_of_another_tenant_already_exists(rpcs: Rpcs) -> None:
    await rpcs.call(
        "CreateSession", pb.CreateSessionRequest(session_id=SID, tenant="acme", no_start=True))
    request = pb.CreateSessionRequest(session_id=SID, tenant="globex", no_start=True)
    failure = await rpcs.fails("CreateSession", request)
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert (failure.reason, failure.metadata) == ("SESSION_EXISTS", {"session_id": SID})


async def test_a_bug_is_internal_without_its_details(
    rpcs: Rpcs, manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(session_id: str) -> NoReturn:
        raise KeyError("secret internals")

    monkeypatch.setattr(manager, "get", broken)
    failure = await rpcs.fails("GetSession", pb.GetSessionRequest(session_id=SID))
    assert failure.code == grpc.StatusCode.INTERNAL
    assert failure.reason == "INTERNAL"
    assert "secret" not in failure.message


# -- StreamStatus ----------------------------------------------------------------


def _event(seq: int, state: State) -> StatusEvent:
    return StatusEvent(SID, "default", seq, state, State.STOPPED, at=float(seq))


async def test_stream_status_sends_a_snapshot_then_live_events_once(
    servicer: BrokerServicer, rpcs: Rpcs, manager: SessionManager
) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    stored = await manager.store.append_event(_event(1, State.CONNECTING))
    stream = servicer.StreamStatus(pb.StreamStatusRequest(session_ids=[SID]), ctx())
    (snapshot,) = await read(stream, 1)
    assert snapshot.snapshot and not snapshot.resync
    assert (snapshot.event_id, snapshot.state) == (stored.event_id, pb.CONNECTING)
    manager.bus.publish(stored)  # already in the snapshot: dropped by sequence
    live = await manager.store.append_event(_event(2, State.OPEN))
    manager.bus.publish(live)
    (event,) = await read(stream, 1)
    assert (event.sequence, event.state, event.snapshot) == (2, pb.OPEN, False)
    await stream.aclose()
    assert manager.bus.subscriber_count == 0


async def test_stream_status_resumes_with_the_missed_events_only(
    servicer: BrokerServicer, rpcs: Rpcs, manager: SessionManager
) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    seen = await manager.store.append_event(_event(1, State.CONNECTING))
    missed = [await manager.store.append_event(_event(n, State.OPEN)) for n in (2, 3)]
    request = pb.StreamStatusRequest(session_ids=[SID], resume_after=seen.event_id)
    stream = servicer.StreamStatus(request, ctx())
    replayed = await read(stream, 2)
    assert [e.event_id for e in replayed] == [e.event_id for e in missed]
    assert not any(e.snapshot for e in replayed)
    manager.bus.publish(missed[1])  # published after the replay read it: not twice
    last = await manager.store.append_event(_event(4, State.RECONNECTING))
    manager.bus.publish(last)
    assert [e.sequence for e in await read(stream, 1)] == [4]
    await stream.aclose()


async def test_stream_status_resyncs_when_the_cursor_is_unknown(
    servicer: BrokerServicer, rpcs: Rpcs, manager: SessionManager
) -> None:
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    request = pb.StreamStatusRequest(session_ids=[SID], resume_after="not-an-id")
    stream = servicer.StreamStatus(request, ctx())
    (event,) = await read(stream, 1)
    assert event.snapshot and event.resync
    assert (event.state, event.reason) == (pb.STOPPED, "not started")
    await stream.aclose()


async def test_stream_status_of_an_unknown_session_is_not_found(
    servicer: BrokerServicer,
) -> None:
    context = FakeContext()
    request = pb.StreamStatusRequest(session_ids=["ghost"])
    stream = servicer.StreamStatus(request, cast(Any, context))
    with pytest.raises(grpc.aio.AbortError):
        await anext(stream)
    assert context.status is not None
    failure = _failure(context.status)
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.metadata == {"session_id": "ghost"}


async def test_a_subscriber_that_falls_behind_is_cut_off_and_told_to_resume(
    manager: SessionManager, servicer: BrokerServicer, rpcs: Rpcs,
) -> None:
    manager.bus.buffer = 1
    await rpcs.call("CreateSession", pb.CreateSessionRequest(session_id=SID, no_start=True))
    context = FakeContext()
    stream = servicer.StreamStatus(pb.StreamStatusRequest(), cast(Any, context))
    await read(stream, 1)  # the snapshot; now subscribed
    for seq in (1, 2):
        manager.bus.publish(_event(seq, State.OPEN))
    with pytest.raises(grpc.aio.AbortError):
        await read(stream, 1)
    assert context.status is not None
    failure = _failure(context.status)
    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.reason == "SUBSCRIBER_TOO_SLOW"
    assert failure.retry_after_s == pytest.approx(0.1)
    assert manager.bus.subscriber_count == 0
