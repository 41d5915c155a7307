"""The one place where domain errors become gRPC statuses with rich details.

Every error carries a google.rpc.ErrorInfo (domain "broker.v1", a
machine-readable reason, metadata) and, when waiting helps, a RetryInfo, so
clients branch on `reason` instead of parsing messages.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import BrokerError

log = logging.getLogger(__name__)
DOMAIN = "broker.v1"

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def to_status(error: BrokerError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    details = [_pack(info)]
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=details)
    return rpc_status.to_status(status)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    # grpc-stubs lacks abort_with_status on the aio context; it always raises AbortError.
    await cast(Any, context).abort_with_status(status)


def _internal(exc: Exception) -> BrokerError:
    log.exception("unexpected error in RPC", exc_info=exc)
    return BrokerError("internal error; see the broker's log", reason="INTERNAL")


def unary(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Map BrokerError (and any bug) raised by a unary handler to a rich status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            return await handler(self, request, context)
        except BrokerError as exc:
            await _abort(context, to_status(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, to_status(_internal(exc)))
        raise AssertionError("unreachable")  # abort_with_status always raises

    return wrapper


def streaming(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Resp]]:
    """The same mapping for server-streaming handlers."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in handler(self, request, context):
                yield item
        except BrokerError as exc:
            await _abort(context, to_status(exc))
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, to_status(_internal(exc)))

    return wrapper
