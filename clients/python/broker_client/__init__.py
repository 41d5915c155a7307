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
    UpdateReceiver,
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
from .sync import SyncBrokerClient, SyncInboundReceiver, SyncStatusWatch, SyncUpdateReceiver
from .v1.broker_pb2 import (
    InboundMessage,
    MessageInfo,
    MessageStatus,
    MessageUpdate,
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
    "MessageInfo",
    "MessageRefused",
    "MessageStatus",
    "MessageUpdate",
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
    "SyncUpdateReceiver",
    "Unauthenticated",
    "Unavailable",
    "UpdateReceiver",
    "error_from_rpc",
    "reason_name",
]
