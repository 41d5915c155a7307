"""Domain objects to broker.v1 messages (one direction: the API only reports).

Requests need little converting: their fields are plain strings and numbers the
runtime takes as they are (and validates, through broker.validation); a Send's
content becomes the domain's `broker.content.Content`.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from broker import content as contents
from broker.content import Content, Media, Presence
from broker.engines.status import EngineStatus
from broker.errors import BrokerError, ErrorReason
from broker.lifecycle.health import Recommendation, SessionStats, Severity
from broker.lifecycle.states import State
from broker.runtime.manager import HealthView, QrView, SendOutcome, SessionView
from broker.runtime.sendflow import SendItem
from broker.runtime.updates import MessageInfo, UpdateDelivery
from broker.runtime.watch import Origin, Watched
from broker.store.base import InboundDelivery, StatusEvent
from broker_client.v1 import broker_pb2 as pb


def timestamp(at: float | None) -> Timestamp | None:
    if not at:
        return None
    ts = Timestamp()
    _set_time(ts, at)
    return ts


def _set_time(field: Timestamp, at: float | None) -> None:
    """Set a Timestamp field in place to `at` (epoch seconds); 0 or None leaves it unset."""
    if at:
        field.FromNanoseconds(int(at * 1e9))


def state(value: State | None) -> pb.SessionState.ValueType:
    if value is None:
        return pb.SESSION_STATE_UNSPECIFIED
    return pb.SessionState.Value(value.value)


def session(view: SessionView) -> pb.Session:
    return pb.Session(
        session_id=view.record.session_id, tenant=view.record.tenant, state=state(view.state),
        reason=view.reason, code=view.code, has_credentials=view.has_credentials,
        outbox_depth=view.outbox_depth, sequence=view.sequence,
        updated_at=timestamp(view.updated_at),
    )


def send_response(outcome: SendOutcome) -> pb.SendResponse:
    response = pb.SendResponse()
    _fill_send_response(response, outcome)
    return response


def _fill_send_response(response: pb.SendResponse, outcome: SendOutcome) -> None:
    """Set in place: a submessage passed to a constructor is copied, and a SendStream
    answers tens of thousands of these a second."""
    message, result = outcome.message, outcome.result
    response.message_id = message.message_id
    response.status = pb.ACKED if result is not None else pb.QUEUED
    response.duplicate = outcome.duplicate
    response.sequence = message.sequence
    _set_time(response.accepted_at, message.accepted_at)
    _set_time(response.acked_at, result.acked_at if result is not None else None)


def send_item(item: pb.SendItem, time_remaining: float | None) -> SendItem:
    """A many-Sends item: its own deadline, else what is left of the call's."""
    request = item.request
    timeout = item.timeout_ms / 1000 if item.timeout_ms else send_timeout(time_remaining)
    return SendItem(ref=item.ref, session_id=request.session_id, to=request.to,
                    body=request.body, idempotency_key=request.idempotency_key,
                    wait=not request.no_wait, timeout=timeout, content=send_content(request))


def send_content(request: pb.SendRequest) -> Content | None:
    """The request's content, None when it has none (plain text in `body`)."""
    return contents.from_proto(request.content) if request.HasField("content") else None


def presence(value: int) -> Presence | None:
    """None for PRESENCE_UNSPECIFIED or an unknown number (refused by the manager)."""
    found: Presence | None = contents.PRESENCE_FROM_PB.get(value)  # type: ignore[call-overload]
    return found


def send_results(finished: Sequence[tuple[int, object]]) -> pb.SendBatchResponse:
    """A many-Sends answer, its results built in place (see `_fill_send_response`)."""
    batch = pb.SendBatchResponse()
    add = batch.results.add
    for ref, outcome in finished:
        _fill_send_result(add(), ref, outcome)
    return batch


def _fill_send_result(result: pb.SendResult, ref: int, outcome: object) -> None:
    result.ref = ref
    if isinstance(outcome, BrokerError):
        result.error.CopyFrom(pb.SendError(
            code=outcome.code.value[0], reason=ErrorReason.Reason.Value(outcome.reason),
            message=outcome.message, metadata=outcome.metadata,
            retry_after_ms=int((outcome.retry_after_s or 0) * 1000)))
        return
    assert isinstance(outcome, SendOutcome)
    _fill_send_response(result.response, outcome)


def status_event(
    event: StatusEvent, *, snapshot: bool = False, resync: bool = False
) -> pb.StatusEvent:
    return pb.StatusEvent(
        event_id=event.event_id, session_id=event.session_id, tenant=event.tenant,
        sequence=event.sequence, state=state(event.state), previous_state=state(event.previous),
        reason=event.reason, code=event.code,
        retry_in_ms=int(event.retry_in_s * 1000) if event.retry_in_s is not None else 0,
        qr=event.qr or "", at=timestamp(event.at), snapshot=snapshot, resync=resync,
        attempt=event.attempt,
    )


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
    message = status_event(event)
    _converted[id(event)] = (event, message)  # holding the event keeps its id unique
    if len(_converted) > _RECENT_EVENTS:
        _converted.popitem(last=False)
    return message


def watched(item: Watched) -> pb.StatusEvent:
    """One event of a status watch, flagged by where it came from."""
    event, origin = item
    if origin is Origin.LIVE:
        return _live_event(event)
    if origin is Origin.REPLAY:
        return status_event(event)
    return status_event(event, snapshot=True, resync=origin is Origin.RESYNC)


def send_timeout(time_remaining: float | None) -> float | None:
    """How long Send may wait for the ack: the caller's deadline less a margin to answer."""
    if time_remaining is None:
        return None
    return max(time_remaining - min(0.05, time_remaining / 10), 0.0)


def message_update(delivery: UpdateDelivery) -> pb.MessageUpdate:
    u = delivery.update
    return pb.MessageUpdate(session_id=u.session_id, update_id=u.update_id,
                            message_id=u.message_id, status=pb.MessageStatus.ValueType(u.status),
                            at=timestamp(u.at), code=u.code, reason=u.reason,
                            delivery_count=delivery.delivery_count)


def message_info(info: MessageInfo) -> pb.MessageInfo:
    sent = info.sent
    return pb.MessageInfo(
        session_id=info.session_id, message_id=info.message_id,
        status=pb.MessageStatus.ValueType(info.status), status_at=timestamp(info.status_at),
        code=info.code, reason=info.reason, to=sent.to if sent else "",
        sequence=sent.sequence if sent else 0,
        accepted_at=timestamp(sent.accepted_at if sent else None))


def engine_health(status: EngineStatus) -> pb.EngineHealth:
    return pb.EngineHealth(name=status.name, up=status.up, detail=status.detail,
                           starts=status.starts, since=timestamp(status.since))


def inbound_message(delivery: InboundDelivery) -> pb.InboundMessage:
    record = delivery.record
    origin = record.origin
    return pb.InboundMessage(
        session_id=record.session_id, inbound_id=record.inbound_id,
        upstream_id=record.upstream_id, sender=record.sender, body=record.body,
        received_at=timestamp(record.received_at), delivery_count=delivery.delivery_count,
        sender_lid=origin.sender_lid, push_name=origin.push_name, chat=origin.chat,
        sent_at=timestamp(origin.sent_at),
        # The stored payload is the serialized pb.Content (broker.content.encode).
        content=pb.Content.FromString(record.content) if record.content else None,
    )


def media_chunks(media: Media, data: bytes, chunk_bytes: int) -> Iterator[pb.MediaChunk]:
    """A kept medium as DownloadMedia's chunks, in order (one empty chunk for no bytes)."""
    size = len(data)
    for offset in range(0, max(size, 1), chunk_bytes):
        yield pb.MediaChunk(data=data[offset:offset + chunk_bytes], offset=offset, size=size,
                            mime_type=media.mime_type)


_SEVERITY = {Severity.INFO: pb.INFO, Severity.WARNING: pb.WARNING, Severity.CRITICAL: pb.CRITICAL}


def recommendation(rec: Recommendation) -> pb.Recommendation:
    return pb.Recommendation(severity=_SEVERITY[rec.severity], code=rec.code, message=rec.message)


def counters(
    stats: SessionStats, now: float, outbox_depth: int, failures: int
) -> pb.Counters:
    c = stats.counters(now, outbox_depth=outbox_depth, consecutive_failures=failures)
    return pb.Counters(
        disconnects_last_hour=c.disconnects_last_hour, connects_total=c.connects_total,
        disconnects_total=c.disconnects_total, reconnect_ms_mean=c.reconnect_ms_mean,
        reconnect_ms_last=c.reconnect_ms_last, keepalive_sent=c.keepalive_sent,
        keepalive_ok=c.keepalive_ok, keepalive_success_rate=c.keepalive_success_rate,
        messages_accepted=c.messages_accepted, messages_acked=c.messages_acked,
        delivery_rate=c.delivery_rate, outbox_depth=outbox_depth,
        consecutive_failures=c.consecutive_failures,
        availability_last_hour=c.availability_last_hour,
        availability_window_s=c.availability_window_s,
        reconnect_gap_ms_p50=c.reconnect_gap_ms_p50, reconnect_gap_ms_p99=c.reconnect_gap_ms_p99,
        reconnect_gap_ms_max=c.reconnect_gap_ms_max, attempts_per_minute=c.attempts_per_minute,
        attempts_held_back_last_hour=c.attempts_held_back_last_hour,
        messages_refused=c.messages_refused, messages_delivered=c.messages_delivered,
        delivered_rate_last_hour=c.delivered_rate_last_hour,
    )


def health(item: HealthView) -> pb.SessionHealth:
    recent = [
        pb.Transition(
            from_state=state(t.previous), to_state=state(t.state), reason=t.reason, code=t.code,
            at=timestamp(t.at),
        )
        for t in item.stats.recent
    ]
    return pb.SessionHealth(
        session=session(item.view), live_state=state(item.live_state), recent=recent,
        counters=counters(item.stats, item.now, item.view.outbox_depth, item.attempt),
        recommendations=[recommendation(r) for r in item.recommendations],
        healthy=not any(r.severity != Severity.INFO for r in item.recommendations),
        owner=item.owner, last_activity=timestamp(item.last_activity), engine=item.engine,
    )


def qr(view: QrView) -> pb.QrCode:
    return pb.QrCode(
        session_id=view.session_id, qr=view.qr, index=view.index,
        expires_at=timestamp(view.expires_at),
    )
