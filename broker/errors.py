"""Typed errors of the broker's domain.

Each carries a machine-readable `reason` (ErrorInfo.reason in domain
"broker.v1") and the gRPC status it maps to; `broker.api.status` turns them
into rich gRPC statuses in one place, so no servicer decides codes itself.
Reasons are values of the proto's ErrorReason.Reason, so the server and the
clients share one list; the wire carries the value's name.
"""

from __future__ import annotations

from typing import ClassVar, TypeAlias

import grpc

from broker_client.v1.broker_pb2 import ErrorReason

__all__ = [
    "BrokerError", "ErrorReason", "InvalidArgument", "MediaNotFound", "MediaUnavailable",
    "MessageNotFound", "MessageRefused",
    "NotDeliveredYet", "NotOwner", "OutboxFull", "PairingRefused", "PermissionDenied",
    "PresenceNotSent", "RateLimited", "Reason", "SessionExists",
    "SessionNotFound", "SessionNotReady", "StoreUnavailable", "SubscriberTooSlow",
    "Unauthenticated", "reason_name",
]

Reason: TypeAlias = "ErrorReason.Reason.ValueType"


def reason_name(reason: Reason) -> str:
    """The string ErrorInfo.reason carries, e.g. "OUTBOX_FULL"."""
    return ErrorReason.Reason.Name(reason)


class BrokerError(Exception):
    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_reason: ClassVar[Reason] = ErrorReason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        session_id: str | None = None,
        retry_after_s: float | None = None,
        **metadata: str,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: The wire name of the reason (ErrorInfo.reason), e.g. "NOT_OWNER".
        self.reason = reason_name(self.default_reason if reason is None else reason)
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata)
        if session_id is not None:
            self.metadata["session_id"] = session_id


class InvalidArgument(BrokerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = ErrorReason.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class SessionNotFound(BrokerError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = ErrorReason.SESSION_NOT_FOUND

    def __init__(self, session_id: str) -> None:
        super().__init__(f"unknown session {session_id!r}", session_id=session_id)


class SessionExists(BrokerError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = ErrorReason.SESSION_EXISTS


class SessionNotReady(BrokerError):
    """The session cannot take messages until a person acts (re-pair, restart)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.SESSION_STOPPED


class PairingRefused(BrokerError):
    """The session is pairing but the upstream gave no pairing code."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.PAIRING_CODE_REFUSED


class MessageNotFound(BrokerError):
    """GetMessage of a message id the broker does not know (or no longer keeps)."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = ErrorReason.MESSAGE_NOT_FOUND


class MediaNotFound(BrokerError):
    """DownloadMedia of a message the broker does not keep, or one without a medium."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = ErrorReason.MEDIA_NOT_FOUND


class MediaUnavailable(BrokerError):
    """DownloadMedia of a medium the broker could not keep (metadata.why says why)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.MEDIA_UNAVAILABLE


class MessageRefused(BrokerError):
    """The upstream refused the message for good (WhatsApp e.g. 463, 475): not resent."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.MESSAGE_REFUSED


class NotDeliveredYet(BrokerError):
    """Accepted and queued, but no upstream ack before the deadline: retry with the same key."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.NOT_DELIVERED_YET


class PresenceNotSent(BrokerError):
    """A presence update the session could not send now (not open here); never queued."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.SESSION_NOT_OPEN


class StoreUnavailable(BrokerError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.STORE_UNAVAILABLE


class StoreInUse(BrokerError):
    """The embedded database is held by another broker process (one process only)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.STORE_IN_USE


class StoreSchemaError(BrokerError):
    """The embedded database cannot be used as it is: written by a newer release,
    or on a file system without write-ahead logging."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = ErrorReason.STORE_SCHEMA


class NotOwner(BrokerError):
    """A write carried a stale fencing token: another owner holds the session now.

    The writer must stop owning at once; a caller may retry (any instance accepts)."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = ErrorReason.NOT_OWNER


class OutboxFull(BrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.OUTBOX_FULL


class RateLimited(BrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.RATE_LIMITED


class SubscriberTooSlow(BrokerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = ErrorReason.SUBSCRIBER_TOO_SLOW


class Unauthenticated(BrokerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = ErrorReason.UNAUTHENTICATED


class PermissionDenied(BrokerError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = ErrorReason.PERMISSION_DENIED
