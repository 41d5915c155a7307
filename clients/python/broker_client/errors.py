"""Typed errors for the broker client.

Every failed RPC is decoded in exactly one place (:func:`error_from_rpc`) so
callers can ``except NeedsPairing`` instead of inspecting status codes and
parsing rich details themselves.
"""

from __future__ import annotations

from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from .v1 import broker_pb2
from .v1.broker_pb2 import ErrorReason

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "BrokerError",
    "DeadlineExceeded",
    "ErrorReason",
    "FailedPrecondition",
    "InvalidArgument",
    "LoggedOut",
    "MessageRefused",
    "NeedsPairing",
    "NotDeliveredYet",
    "PermissionDenied",
    "ResourceExhausted",
    "SessionNotFound",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
    "reason_name",
]

#: The ErrorInfo domain the broker stamps on every error it raises.
DOMAIN = "broker.v1"

_DETAILS_KEY = "grpc-status-details-bin"


def reason_name(reason: ErrorReason.Reason.ValueType) -> str:
    """The string the broker puts in ErrorInfo.reason (and :attr:`BrokerError.reason`)
    for an ``ErrorReason`` value, e.g. ``reason_name(ErrorReason.OUTBOX_FULL)``."""
    return ErrorReason.Reason.Name(reason)


class BrokerError(Exception):
    """Any failed broker call: status code, machine reason, metadata and retry hint."""

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        #: ErrorInfo.reason: an ``ErrorReason`` name (see :func:`reason_name`), or "".
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after = retry_after

    @property
    def session_id(self) -> str | None:
        """The session the error is about, when the broker said so."""
        return self.metadata.get("session_id")

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r}, "
            f"retry_after={self.retry_after!r})"
        )


class InvalidArgument(BrokerError):
    """Bad input; ``metadata["field"]`` names the offending field."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class SessionNotFound(BrokerError):
    """The broker does not know the session."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(BrokerError):
    """The session is not in a state that allows the call (stopped, conflict, failed...)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class LoggedOut(FailedPrecondition):
    """The login was logged out; a new pairing is needed (restart the session)."""


class NeedsPairing(FailedPrecondition):
    """The session waits for a QR code to be scanned."""


class MessageRefused(FailedPrecondition):
    """The upstream refused the message for good (WhatsApp e.g. 463, 475); the broker
    does not resend it. ``metadata["code"]`` is the upstream's code and
    ``metadata["message_id"]`` the message; a retry with the same key says the same."""


class Unavailable(BrokerError):
    """Transient: the broker, its store or the upstream is unreachable right now."""

    default_code = grpc.StatusCode.UNAVAILABLE


class NotDeliveredYet(Unavailable):
    """Accepted and queued, but not acked before the deadline: retry with the same key."""


class ResourceExhausted(BrokerError):
    """Outbox full, rate limited, or a status subscriber fell too far behind."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AlreadyExists(BrokerError):
    """The session id is taken by another tenant."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(BrokerError):
    """Missing or invalid token."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BrokerError):
    """The token is valid but not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(BrokerError):
    """The call's deadline (or the client's retry budget) ran out."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: SessionNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

# Finer classes by reason; only used when the code agrees, so a reason can
# never turn e.g. an INVALID_ARGUMENT into an Unavailable (and get retried).
_BY_REASON: dict[str, type[BrokerError]] = {
    reason_name(ErrorReason.LOGGED_OUT): LoggedOut,
    reason_name(ErrorReason.NEEDS_PAIRING): NeedsPairing,
    reason_name(ErrorReason.NOT_DELIVERED_YET): NotDeliveredYet,
    reason_name(ErrorReason.MESSAGE_REFUSED): MessageRefused,
}


def _rich_status(err: Any) -> status_pb2.Status | None:
    """The google.rpc.Status from the trailers, tolerating a code/message mismatch."""
    try:
        status: status_pb2.Status | None = rpc_status.from_call(err)
        return status
    except ValueError:
        pass  # grpc-status insists code and message match; the details are still useful
    except Exception:
        return None
    try:
        for key, value in err.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                return status_pb2.Status.FromString(value)
    except Exception:
        return None
    return None


def _decode_details(
    details: list[any_pb2.Any],
) -> tuple[str, dict[str, str], float | None]:
    """Reason, metadata and retry delay from packed ErrorInfo / RetryInfo."""
    reason = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    found_ours = False
    for packed in details:
        if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            packed.Unpack(info)
            ours = info.domain == DOMAIN
            # Prefer our domain; take a foreign ErrorInfo only when there is no other.
            if not found_ours and (ours or not reason):
                reason, metadata, found_ours = info.reason, dict(info.metadata), ours
        elif packed.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            packed.Unpack(info_r)
            retry_after = max(0.0, info_r.retry_delay.ToTimedelta().total_seconds())
    return reason, metadata, retry_after


def error_from_rpc(err: grpc.RpcError) -> BrokerError:
    """Turn a raw (sync or aio) gRPC error into the matching :class:`BrokerError`."""
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = details_fn() if callable(details_fn) else None
    message = message if isinstance(message, str) else str(err)

    reason, retry_after = "", None
    metadata: dict[str, str] = {}
    status = _rich_status(err)
    if status is not None:
        reason, metadata, retry_after = _decode_details(list(status.details))
        message = message or status.message

    cls = _BY_CODE.get(code, BrokerError)
    finer = _BY_REASON.get(reason)
    if finer is not None and finer.default_code == code:
        cls = finer
    return cls(message, code=code, reason=reason, metadata=metadata, retry_after=retry_after)


def error_from_send_error(error: broker_pb2.SendError) -> BrokerError:
    """The :class:`BrokerError` one failed item of SendStream/SendBatch stands for: the
    same class, reason and metadata a unary Send of that message would have raised."""
    try:
        code = next(c for c in grpc.StatusCode if c.value[0] == error.code)
    except StopIteration:
        code = grpc.StatusCode.UNKNOWN
    reason = reason_name(error.reason) if error.reason else ""
    cls = _BY_CODE.get(code, BrokerError)
    finer = _BY_REASON.get(reason)
    if finer is not None and finer.default_code == code:
        cls = finer
    retry_after = error.retry_after_ms / 1000 if error.retry_after_ms else None
    return cls(error.message, code=code, reason=reason, metadata=dict(error.metadata),
               retry_after=retry_after)
