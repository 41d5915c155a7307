"""A scripted Broker servicer: real gRPC, canned answers, recorded requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker_client.v1 import broker_pb2, broker_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")


def rich_status(
    code: grpc.StatusCode,
    reason: str,
    message: str = "",
    *,
    metadata: Mapping[str, str] | None = None,
    retry_after: float | None = None,
    domain: str = "broker.v1",
) -> grpc.Status:
    """A grpc.Status carrying ErrorInfo (and RetryInfo) the way the broker sends them."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata or {}))
    details = [info]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(timedelta(seconds=retry_after))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message or reason, details=details
    )
    return rpc_status.to_status(status)


def not_delivered(session_id: str = "s1", retry_after: float | None = None) -> grpc.Status:
    return rich_status(
        grpc.StatusCode.UNAVAILABLE,
        "NOT_DELIVERED_YET",
        "queued, not acked yet",
        metadata={"session_id": session_id},
        retry_after=retry_after,
    )


async def abort(context: Context, status: grpc.Status) -> NoReturn:
    # grpc-stubs lacks abort_with_status on the aio context; grpc.aio has it.
    await context.abort_with_status(status)  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")


HANG = "hang"
END = "end"


@dataclass
class StreamStep:
    """One StreamStatus call: send ``events``, then abort, end, or hang until cancelled."""

    events: list[broker_pb2.StatusEvent]
    then: grpc.Status | str = HANG


def event(event_id: str, session_id: str = "s1", state: int = broker_pb2.OPEN) -> Any:
    return broker_pb2.StatusEvent(
        event_id=event_id, session_id=session_id, state=state  # type: ignore[arg-type]
    )


@dataclass
class ScriptedBroker(broker_pb2_grpc.BrokerServicer):
    """Answers from scripts and records what it was asked (requests, metadata, deadlines)."""

    send_script: list[grpc.Status | None] = field(default_factory=list)
    #: Used once the script is used up; None succeeds.
    send_default: grpc.Status | None = None
    send_hang: bool = False
    #: What DownloadMedia streams.
    media_chunks: list[broker_pb2.MediaChunk] = field(default_factory=list)
    stream_script: list[StreamStep] = field(default_factory=list)
    stream_default: StreamStep = field(default_factory=lambda: StreamStep([], HANG))
    unary_error: grpc.Status | None = None
    #: SendBatch calls, in turn: a status to end the call with, or per item (by ref) the
    #: code and reason to fail it with (absent: it succeeds). Used up (or None): an
    #: older release without SendBatch (UNIMPLEMENTED).
    batch_script: list[grpc.Status | dict[int, tuple[grpc.StatusCode, str]]] | None = None
    batch_requests: list[broker_pb2.SendBatchRequest] = field(default_factory=list)
    batch_refused: int = 0

    send_requests: list[broker_pb2.SendRequest] = field(default_factory=list)
    send_deadlines: list[float | None] = field(default_factory=list)
    stream_requests: list[broker_pb2.StreamStatusRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    stream_opened: asyncio.Event = field(default_factory=asyncio.Event)
    #: Receive calls: each sends its messages, then aborts with the status or hangs (None).
    receive_script: list[tuple[list[broker_pb2.InboundMessage], grpc.Status | None]] = field(
        default_factory=list)
    receive_requests: list[broker_pb2.ReceiveRequest] = field(default_factory=list)
    ack_requests: list[broker_pb2.AckInboundRequest] = field(default_factory=list)
    presence_requests: list[broker_pb2.SendPresenceRequest] = field(default_factory=list)

    def _record(self, context: Context) -> None:
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})

    async def Send(
        self, request: broker_pb2.SendRequest, context: Context
    ) -> broker_pb2.SendResponse:
        self._record(context)
        self.send_requests.append(request)
        self.send_deadlines.append(context.time_remaining())
        if self.send_hang:
            await asyncio.Event().wait()
        status = self.send_script.pop(0) if self.send_script else self.send_default
        if status is not None:
            await abort(context, status)
        response = broker_pb2.SendResponse(
            message_id=f"msg-{request.idempotency_key}",
            status=broker_pb2.QUEUED if request.no_wait else broker_pb2.ACKED,
            duplicate=len(self.send_requests) > 1,
            sequence=7,
        )
        response.accepted_at.GetCurrentTime()
        if not request.no_wait:
            response.acked_at.GetCurrentTime()
        return response

    async def SendStream(
        self, request_iterator: AsyncIterator[broker_pb2.SendBatchRequest], context: Context
    ) -> AsyncIterator[broker_pb2.SendBatchResponse]:
        """A broker of a release without SendStream: the client falls back to Send."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no SendStream in this release")
        yield broker_pb2.SendBatchResponse()  # pragma: no cover

    async def SendBatch(
        self, request: broker_pb2.SendBatchRequest, context: Context
    ) -> broker_pb2.SendBatchResponse:
        if not self.batch_script:
            self.batch_refused += 1
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no SendBatch in this release")
        self._record(context)
        self.batch_requests.append(request)
        step = self.batch_script.pop(0)
        if isinstance(step, grpc.Status):
            await abort(context, step)
        response = broker_pb2.SendBatchResponse()
        for item in request.items:
            result = response.results.add(ref=item.ref)
            failed = step.get(item.ref)
            if failed is None:
                result.response.message_id = f"msg-{item.request.idempotency_key}"
                result.response.status = broker_pb2.ACKED
            else:
                code, reason = failed
                result.error.code = code.value[0]
                result.error.reason = broker_pb2.ErrorReason.Reason.Value(reason)
                result.error.message = reason
        return response

    async def StreamStatus(
        self, request: broker_pb2.StreamStatusRequest, context: Context
    ) -> AsyncIterator[broker_pb2.StatusEvent]:
        self._record(context)
        self.stream_requests.append(request)
        self.stream_opened.set()
        step = self.stream_script.pop(0) if self.stream_script else self.stream_default
        for ev in step.events:
            yield ev
        if isinstance(step.then, grpc.Status):
            await abort(context, step.then)
        if step.then == HANG:
            await asyncio.Event().wait()

    async def _unary(self, context: Context, make: Callable[[], _T]) -> _T:
        self._record(context)
        if self.unary_error is not None:
            await abort(context, self.unary_error)
        return make()

    async def CreateSession(
        self, request: broker_pb2.CreateSessionRequest, context: Context
    ) -> broker_pb2.Session:
        state = broker_pb2.STOPPED if request.no_start else broker_pb2.CONNECTING
        return await self._unary(
            context,
            lambda: broker_pb2.Session(
                session_id=request.session_id, tenant=request.tenant or "default", state=state
            ),
        )

    async def GetSession(
        self, request: broker_pb2.GetSessionRequest, context: Context
    ) -> broker_pb2.Session:
        return await self._unary(
            context, lambda: broker_pb2.Session(session_id=request.session_id)
        )

    async def Health(
        self, request: broker_pb2.HealthRequest, context: Context
    ) -> broker_pb2.HealthResponse:
        return await self._unary(
            context,
            lambda: broker_pb2.HealthResponse(
                sessions=[
                    broker_pb2.SessionHealth(
                        session=broker_pb2.Session(session_id=sid), healthy=True
                    )
                    for sid in request.session_ids
                ]
            ),
        )

    async def GetQr(self, request: broker_pb2.SessionRef, context: Context) -> broker_pb2.QrCode:
        return await self._unary(
            context, lambda: broker_pb2.QrCode(session_id=request.session_id, qr="QR", index=1)
        )

    async def RequestPairingCode(
        self, request: broker_pb2.RequestPairingCodeRequest, context: Context
    ) -> broker_pb2.PairingCode:
        return await self._unary(
            context, lambda: broker_pb2.PairingCode(session_id=request.session_id,
                                                    code="ABCD1234"))

    async def ListSessions(
        self, request: broker_pb2.ListSessionsRequest, context: Context
    ) -> broker_pb2.ListSessionsResponse:
        return await self._unary(
            context,
            lambda: broker_pb2.ListSessionsResponse(
                sessions=[broker_pb2.Session(session_id="s1", tenant=request.tenant)]
            ),
        )

    async def StopSession(
        self, request: broker_pb2.SessionRef, context: Context
    ) -> broker_pb2.Session:
        return await self._unary(
            context,
            lambda: broker_pb2.Session(session_id=request.session_id, state=broker_pb2.STOPPED),
        )

    async def LogoutSession(
        self, request: broker_pb2.SessionRef, context: Context
    ) -> broker_pb2.Session:
        return await self._unary(
            context,
            lambda: broker_pb2.Session(session_id=request.session_id, state=broker_pb2.LOGGED_OUT),
        )

    async def RestartSession(
        self, request: broker_pb2.SessionRef, context: Context
    ) -> broker_pb2.Session:
        return await self._unary(
            context,
            lambda: broker_pb2.Session(session_id=request.session_id, state=broker_pb2.CONNECTING),
        )

    async def DeleteSession(
        self, request: broker_pb2.SessionRef, context: Context
    ) -> broker_pb2.DeleteSessionResponse:
        return await self._unary(context, broker_pb2.DeleteSessionResponse)

    async def Receive(
        self, request: broker_pb2.ReceiveRequest, context: Context
    ) -> AsyncIterator[broker_pb2.InboundMessage]:
        self._record(context)
        self.receive_requests.append(request)
        messages, then = self.receive_script.pop(0) if self.receive_script else ([], None)
        for message in messages:
            yield message
        if then is not None:
            await abort(context, then)
        await asyncio.Event().wait()

    async def AckInbound(
        self, request: broker_pb2.AckInboundRequest, context: Context
    ) -> broker_pb2.AckInboundResponse:
        self.ack_requests.append(request)
        return await self._unary(
            context, lambda: broker_pb2.AckInboundResponse(acked=len(request.inbound_ids))
        )

    async def ReceiveUpdates(
        self, request: broker_pb2.ReceiveRequest, context: Context
    ) -> AsyncIterator[broker_pb2.MessageUpdate]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        yield broker_pb2.MessageUpdate()  # pragma: no cover - makes this a generator

    async def AckUpdates(
        self, request: broker_pb2.AckUpdatesRequest, context: Context
    ) -> broker_pb2.AckInboundResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        raise AssertionError("abort raises")

    async def GetMessage(
        self, request: broker_pb2.GetMessageRequest, context: Context
    ) -> broker_pb2.MessageInfo:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not scripted")
        raise AssertionError("abort raises")

    async def DownloadMedia(
        self, request: broker_pb2.DownloadMediaRequest, context: Context
    ) -> AsyncIterator[broker_pb2.MediaChunk]:
        self._record(context)
        for chunk in self.media_chunks:
            yield chunk

    async def SendPresence(
        self, request: broker_pb2.SendPresenceRequest, context: Context
    ) -> broker_pb2.SendPresenceResponse:
        self._record(context)
        self.presence_requests.append(request)
        return await self._unary(context, broker_pb2.SendPresenceResponse)


@dataclass(frozen=True)
class PlainStatus(grpc.Status):
    """A status without rich details, as a proxy or an old server would send."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str], ...] = ()
