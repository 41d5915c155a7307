"""broker.v1.Broker: each method validates nothing itself and decides no codes;
it converts, calls the session manager, converts back."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

import grpc

from broker import validation
from broker.api import convert
from broker.api.status import streaming, unary
from broker.errors import SubscriberTooSlow
from broker.runtime.manager import SessionManager
from broker.store.base import InboundDelivery, StatusEvent, event_order
from broker_client.v1 import broker_pb2 as pb
from broker_client.v1 import broker_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_RECENT_EVENTS = 64
_converted: collections.OrderedDict[int, tuple[StatusEvent, pb.StatusEvent]] = (
    collections.OrderedDict()
)


def _live_event(event: StatusEvent) -> pb.StatusEvent:
    """A live event goes to every subscriber: convert it once, not once per stream.

    Keyed by identity (the bus hands every subscriber the same object): hashing
    the event's fields for a thousand subscribers cost more than converting.
    """
    entry = _converted.get(id(event))
    if entry is not None and entry[0] is event:
        return entry[1]
    message = convert.status_event(event)
    _converted[id(event)] = (event, message)  # holding the event keeps its id unique
    if len(_converted) > _RECENT_EVENTS:
        _converted.popitem(last=False)
    return message


class BrokerServicer(pb_grpc.BrokerServicer):
    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager

    @unary
    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        outcome = await self.manager.send(
            request.session_id, request.to, request.body,
            idempotency_key=request.idempotency_key, wait=not request.no_wait,
            timeout=_budget(context),
        )
        return convert.send_response(outcome)

    @streaming
    async def StreamStatus(
        self, request: pb.StreamStatusRequest, context: Context
    ) -> AsyncIterator[pb.StatusEvent]:
        ids = [validation.session_id(s, "session_ids") for s in request.session_ids]
        tenant = validation.optional_tenant(request.tenant)
        for sid in ids:
            await self.manager.get(sid)
        # Subscribe before reading the snapshot or the log, so nothing that
        # happens in between is missed; duplicates are dropped by sequence.
        with self.manager.subscribe(ids, tenant) as sub:
            seen: dict[str, int] = {}
            resync = False
            if request.resume_after:
                page = await self.manager.store.events_after(request.resume_after, 1_000_000)
                resync = page.gap
                if not page.gap:
                    for event in page.events:
                        if sub.matches(event):
                            seen[event.session_id] = event.sequence
                            yield convert.status_event(event)
            if not request.resume_after or resync:
                for event in await self.manager.snapshot(ids, tenant):
                    seen[event.session_id] = event.sequence
                    yield convert.status_event(event, snapshot=True, resync=resync)
            resume_after = event_order(request.resume_after) if request.resume_after else None
            while True:
                live = await sub.get()
                if live is None:
                    raise SubscriberTooSlow(
                        "this subscriber fell too far behind and was cut off; resume from "
                        "the last event_id received", retry_after_s=0.1,
                    )
                if live.sequence <= seen.get(live.session_id, 0):
                    continue
                if resume_after is not None and not resync and \
                        event_order(live.event_id) <= resume_after:
                    continue
                seen[live.session_id] = live.sequence
                yield _live_event(live)

    @unary
    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        ids = [validation.session_id(s, "session_ids") for s in request.session_ids]
        items = await self.manager.health(ids, request.tenant)
        return pb.HealthResponse(sessions=[convert.health(i) for i in items])

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

    @streaming
    async def Receive(
        self, request: pb.ReceiveRequest, context: Context
    ) -> AsyncIterator[pb.InboundMessage]:
        deliveries = self.manager.inbound.receive(
            list(request.session_ids), request.group, request.consumer, request.max_unacked,
        )
        async for delivery in deliveries:
            yield _inbound_message(delivery)

    @unary
    async def AckInbound(
        self, request: pb.AckInboundRequest, context: Context
    ) -> pb.AckInboundResponse:
        acked = await self.manager.inbound.ack(
            request.session_id, request.group, list(request.inbound_ids)
        )
        return pb.AckInboundResponse(acked=acked)


def _inbound_message(delivery: InboundDelivery) -> pb.InboundMessage:
    record = delivery.record
    return pb.InboundMessage(
        session_id=record.session_id, inbound_id=record.inbound_id,
        upstream_id=record.upstream_id, sender=record.sender, body=record.body,
        received_at=convert.timestamp(record.received_at),
        delivery_count=delivery.delivery_count,
    )


def _budget(context: Context) -> float | None:
    """How long Send may wait for the ack: the caller's deadline less a margin to answer."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(remaining - min(0.05, remaining / 10), 0.0)
