"""broker.v1.Broker, in the style of the gRPC examples: each method converts
the request's fields into a session-manager call and the result back into a
message. It validates nothing and decides no status codes: the runtime checks
its inputs (through broker.validation) and raises domain errors, which
broker.api.status maps to rich statuses in one place."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc

from broker.api import convert
from broker.api.auth import item_guard
from broker.api.status import streaming, unary
from broker.engines.status import EngineStatus
from broker.runtime.manager import SessionManager
from broker.runtime.media import CHUNK_BYTES
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class BrokerServicer(pb_grpc.BrokerServicer):
    def __init__(
        self, manager: SessionManager, durability: str = "",
        engine: Callable[[], EngineStatus] | None = None,
    ) -> None:
        self.manager = manager
        self.durability = durability
        self.engine = engine

    @unary
    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        outcome = await self.manager.send(
            request.session_id, request.to, request.body,
            content=convert.send_content(request),
            idempotency_key=request.idempotency_key, wait=not request.no_wait,
            timeout=convert.send_timeout(context.time_remaining()),
        )
        return convert.send_response(outcome)

    @streaming
    async def SendStream(
        self, request_iterator: AsyncIterator[pb.SendBatchRequest], context: Context
    ) -> AsyncGenerator[pb.SendBatchResponse, None]:
        flow = self.manager.send_flow(item_guard.get())

        async def read() -> None:
            try:
                async for request in request_iterator:
                    remaining = context.time_remaining()
                    for item in request.items:
                        await flow.submit(convert.send_item(item, remaining))
            finally:
                flow.close()

        reader = asyncio.create_task(read())
        try:
            async for finished in flow.results():
                yield convert.send_results(finished)
            await reader  # a reading error ends the call with its status
        finally:
            reader.cancel()
            flow.cancel()

    @unary
    async def SendBatch(
        self, request: pb.SendBatchRequest, context: Context
    ) -> pb.SendBatchResponse:
        remaining = context.time_remaining()
        outcomes = await self.manager.send_many(
            [convert.send_item(item, remaining) for item in request.items], item_guard.get())
        return convert.send_results(
            [(item.ref, outcome) for item, outcome in zip(request.items, outcomes, strict=True)])

    @streaming
    async def StreamStatus(
        self, request: pb.StreamStatusRequest, context: Context
    ) -> AsyncGenerator[pb.StatusEvent, None]:
        events = self.manager.watch(request.session_ids, request.tenant, request.resume_after)
        async with aclosing(events):  # unsubscribe as soon as the stream ends
            async for item in events:
                yield convert.watched(item)

    @unary
    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        items = await self.manager.health(request.session_ids, request.tenant)
        engine = convert.engine_health(self.engine()) if self.engine is not None else None
        return pb.HealthResponse(sessions=[convert.health(i) for i in items],
                                 durability=self.durability, engine=engine)

    @unary
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        view = await self.manager.create(
            request.session_id, request.tenant, start=not request.no_start
        )
        return convert.session(view)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        return convert.session(await self.manager.get(request.session_id))

    @unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        views = await self.manager.list_sessions(request.tenant)
        return pb.ListSessionsResponse(sessions=[convert.session(v) for v in views])

    @unary
    async def StopSession(self, request: pb.SessionRef, context: Context) -> pb.Session:
        return convert.session(await self.manager.stop(request.session_id))

    @unary
    async def LogoutSession(self, request: pb.SessionRef, context: Context) -> pb.Session:
        return convert.session(await self.manager.logout(request.session_id))

    @unary
    async def RestartSession(self, request: pb.SessionRef, context: Context) -> pb.Session:
        return convert.session(await self.manager.restart(request.session_id))

    @unary
    async def DeleteSession(
        self, request: pb.SessionRef, context: Context
    ) -> pb.DeleteSessionResponse:
        await self.manager.delete(request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def GetQr(self, request: pb.SessionRef, context: Context) -> pb.QrCode:
        return convert.qr(await self.manager.qr(request.session_id))

    @unary
    async def RequestPairingCode(
        self, request: pb.RequestPairingCodeRequest, context: Context
    ) -> pb.PairingCode:
        code = await self.manager.request_pairing_code(request.session_id, request.phone_number)
        return pb.PairingCode(session_id=request.session_id, code=code)

    @streaming
    async def Receive(
        self, request: pb.ReceiveRequest, context: Context
    ) -> AsyncGenerator[pb.InboundMessage, None]:
        deliveries = self.manager.inbound.receive(
            request.session_ids, request.group, request.consumer, request.max_unacked,
        )
        async with aclosing(deliveries):
            async for delivery in deliveries:
                yield convert.inbound_message(delivery)

    @streaming
    async def ReceiveUpdates(
        self, request: pb.ReceiveRequest, context: Context
    ) -> AsyncGenerator[pb.MessageUpdate, None]:
        deliveries = self.manager.updates.receive(
            request.session_ids, request.group, request.consumer, request.max_unacked,
        )
        async with aclosing(deliveries):
            async for delivery in deliveries:
                yield convert.message_update(delivery)

    @unary
    async def AckUpdates(
        self, request: pb.AckUpdatesRequest, context: Context
    ) -> pb.AckInboundResponse:
        acked = await self.manager.updates.ack(request.session_id, request.group,
                                               request.update_ids)
        return pb.AckInboundResponse(acked=acked)

    @unary
    async def GetMessage(self, request: pb.GetMessageRequest, context: Context) -> pb.MessageInfo:
        return convert.message_info(await self.manager.updates.info(request.session_id,
                                                                     request.message_id))

    @streaming
    async def DownloadMedia(
        self, request: pb.DownloadMediaRequest, context: Context
    ) -> AsyncGenerator[pb.MediaChunk, None]:
        kept = await self.manager.media.download(request.session_id, request.message_id)
        for chunk in convert.media_chunks(kept.media, kept.data, CHUNK_BYTES):
            yield chunk

    @unary
    async def AckInbound(
        self, request: pb.AckInboundRequest, context: Context
    ) -> pb.AckInboundResponse:
        acked = await self.manager.inbound.ack(
            request.session_id, request.group, request.inbound_ids
        )
        return pb.AckInboundResponse(acked=acked)

    @unary
    async def SendPresence(
        self, request: pb.SendPresenceRequest, context: Context
    ) -> pb.SendPresenceResponse:
        await self.manager.send_presence(
            request.session_id, request.chat, convert.presence(request.presence))
        return pb.SendPresenceResponse()
