"""What the page receives: JSON shapes of broker messages, errors, and QR images.

The QR payload never goes into JSON: it is a login credential in waiting, so
it is only served as an SVG image on the dashboard's own origin.
"""

from __future__ import annotations

import io
import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker_client import BrokerError, StatusEvent
from broker_client.v1 import broker_pb2 as pb

#: gRPC status -> the HTTP status a JSON endpoint answers with.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _state(value: int) -> str:
    return pb.SessionState.Name(value)  # type: ignore[arg-type]


def _ms(ts: Timestamp, present: bool) -> int | None:
    return ts.ToMilliseconds() if present else None


def error_json(status: int, code: str, message: str, reason: str = "") -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "reason": reason, "message": message}}


def broker_error(exc: BrokerError) -> tuple[int, dict[str, Any]]:
    """A broker refusal in plain words: its status, ErrorInfo reason and message."""
    status = HTTP_STATUS.get(exc.code, 502)
    return status, error_json(status, exc.code.name, exc.message or str(exc), exc.reason)


def event_to_json(event: StatusEvent, now_ms: int | None = None) -> dict[str, Any]:
    """What the page needs of one StatusEvent, without the QR payload.

    ``retry_left_ms`` is computed here, on the clock that stamped the event,
    so the page's countdown does not depend on the browser's clock.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    at_ms = _ms(event.at, event.HasField("at"))
    retry_left_ms = 0
    if event.retry_in_ms:
        retry_left_ms = (
            event.retry_in_ms if at_ms is None else max(0, at_ms + event.retry_in_ms - now_ms)
        )
    return {
        "event_id": event.event_id,
        "session_id": event.session_id,
        "tenant": event.tenant,
        "sequence": event.sequence,
        "state": _state(event.state),
        "previous_state": _state(event.previous_state),
        "reason": event.reason,
        "code": event.code,
        "retry_in_ms": event.retry_in_ms,
        "retry_left_ms": retry_left_ms,
        "has_qr": bool(event.qr),
        "attempt": event.attempt,
        "at_ms": at_ms,
        "snapshot": event.snapshot,
        "resync": event.resync,
    }


def session_to_json(session: pb.Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "tenant": session.tenant,
        "state": _state(session.state),
        "reason": session.reason,
        "code": session.code,
        "has_credentials": session.has_credentials,
        "outbox_depth": session.outbox_depth,
        "sequence": session.sequence,
        "updated_at_ms": _ms(session.updated_at, session.HasField("updated_at")),
    }


def health_to_json(health: pb.SessionHealth, now_ms: int | None = None) -> dict[str, Any]:
    """A session's Health: recommendations, recent transitions and counters.

    ``now_ms`` (the broker side's clock) lets the page place samples and
    transitions on one time axis.
    """
    c = health.counters
    return {
        "session": session_to_json(health.session),
        "live_state": _state(health.live_state),
        "healthy": health.healthy,
        "owner": health.owner,
        "last_activity_ms": _ms(health.last_activity, health.HasField("last_activity")),
        "now_ms": int(time.time() * 1000) if now_ms is None else now_ms,
        "recommendations": [
            {"severity": pb.Severity.Name(r.severity), "code": r.code, "message": r.message}
            for r in health.recommendations
        ],
        "recent": [
            {"from": _state(t.from_state), "to": _state(t.to_state), "reason": t.reason,
             "code": t.code, "at_ms": _ms(t.at, t.HasField("at"))}
            for t in health.recent
        ],
        "counters": {
            "messages_accepted": c.messages_accepted,
            "messages_acked": c.messages_acked,
            "delivery_rate": c.delivery_rate,
            "outbox_depth": c.outbox_depth,
            "disconnects_last_hour": c.disconnects_last_hour,
            "connects_total": c.connects_total,
            "disconnects_total": c.disconnects_total,
            "reconnect_ms_mean": c.reconnect_ms_mean,
            "reconnect_ms_last": c.reconnect_ms_last,
            "keepalive_success_rate": c.keepalive_success_rate,
            "consecutive_failures": c.consecutive_failures,
            "availability_last_hour": c.availability_last_hour,
        },
    }


def qr_svg(payload: str) -> bytes:
    """The QR code of payload as a standalone SVG document (rendered server-side)."""
    import qrcode
    import qrcode.image.svg

    image = qrcode.make(payload, image_factory=qrcode.image.svg.SvgPathImage, border=2)
    buffer = io.BytesIO()
    image.save(buffer)
    return buffer.getvalue()
