"""Typed Python client for the session broker.

``BrokerClient`` (asyncio) and ``SyncBrokerClient`` (blocking) wrap the
``broker.v1`` gRPC API with retries, deadlines and idempotency built in, and
raise typed :class:`BrokerError` subclasses decoded from rich error details.
"""

from .client import (
    DEFAULT_TARGET,
    BrokerClient,
    InboundReceiver,
    Message,
    SendResult,
    StatusWatch,
)
from .errors import (
    DOMAIN,
    AlreadyExists,
    BrokerError,
    DeadlineExceeded,
    ErrorReason,
    FailedPrecondition,
    InvalidArgument,
    LoggedOut,
    MessageRefused,
    NeedsPairing,
    NotDeliveredYet,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
    reason_name,
)
from .sync import SyncBrokerClient, SyncInboundReceiver, SyncStatusWatch
from .v1.broker_pb2 import (
    InboundMessage,
    QrCode,
    Session,
    SessionHealth,
    SessionState,
    StatusEvent,
)

__all__ = [
    "DEFAULT_TARGET",
    "DOMAIN",
    "AlreadyExists",
    "BrokerClient",
    "BrokerError",
    "DeadlineExceeded",
    "ErrorReason",
    "FailedPrecondition",
    "InboundMessage",
    "InboundReceiver",
    "InvalidArgument",
    "LoggedOut",
    "Message",
    "MessageRefused",
    "NeedsPairing",
    "NotDeliveredYet",
    "PermissionDenied",
    "QrCode",
    "ResourceExhausted",
    "SendResult",
    "Session",
    "SessionHealth",
    "SessionNotFound",
    "SessionState",
    "StatusEvent",
    "StatusWatch",
    "SyncBrokerClient",
    "SyncInboundReceiver",
    "SyncStatusWatch",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
    "reason_name",
]
