"""The one place where domain errors become gRPC statuses with rich details.

Every error carries a google.rpc.ErrorInfo (domain "broker.v1", a
machine-readable reason, metadata) and, when waiting helps, a RetryInfo, so
clients branch on `reason` instead of parsing messages.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker.errors import BrokerError, ErrorReason, InvalidArgument

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


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> NoReturn:
    # grpc-stubs lacks abort_with_status on the aio context; it always raises AbortError.
    await cast(Any, context).abort_with_status(status)
    raise AssertionError("unreachable: abort_with_status raises")


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    """End the call with the error's rich status (a bug's: INTERNAL, logged)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # the call is already ending (the handler aborted it)
    await _abort(context, to_status(exc if isinstance(exc, BrokerError) else _internal(exc)))


def _internal(exc: Exception) -> BrokerError:
    log.exception("unexpected error in RPC", exc_info=exc)
    return BrokerError("internal error; see the broker's log", reason=ErrorReason.INTERNAL)


#: Set on handlers that answer a request that did not parse themselves, so
#: MalformedRequests need not wrap them in one more layer per call and item.
REJECTS_MALFORMED = "rejects_malformed"


def unary(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]:
    """Map BrokerError (and any bug) raised by a unary handler to a rich status."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]) -> Resp:
        try:
            if isinstance(request, _Malformed):
                raise _malformed(request)
            return await handler(self, request, context)
        except Exception as exc:
            await _fail(context, exc)

    setattr(wrapper, REJECTS_MALFORMED, True)
    return wrapper


def streaming(
    handler: Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Resp, None]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Resp, None]]:
    """The same mapping for server-streaming handlers."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[Resp, None]:
        try:
            if isinstance(request, _Malformed):
                raise _malformed(request)
            # aclosing: a stream that ends closes the handler (and what it reads) at once.
            async with aclosing(handler(self, request, context)) as items:
                async for item in items:
                    yield item
        except Exception as exc:
            await _fail(context, exc)

    setattr(wrapper, REJECTS_MALFORMED, True)
    return wrapper


# -- request bytes that are not a valid message ------------------------------

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not generic at run time
    ServerInterceptor = grpc.aio.ServerInterceptor
"""The base class of the broker's interceptors (grpc-stubs makes it generic)."""


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError: corrupt wire format, bad UTF-8, ...
            return _Malformed(exc)

    return parse


def _malformed(request: _Malformed) -> InvalidArgument:
    return InvalidArgument("request", f"is not a valid protobuf message ({request.error})")


async def _reject(context: grpc.aio.ServicerContext[Any, Any], request: _Malformed) -> None:
    await _abort(context, to_status(_malformed(request)))


class MalformedRequests(ServerInterceptor):
    """Answer undecodable request bytes INVALID_ARGUMENT (with ErrorInfo), not UNKNOWN.

    grpc.aio answers a request deserializer that raises with UNKNOWN; this one
    parses leniently and rejects in the handler instead (handlers marked with
    REJECTS_MALFORMED, the broker's own, check for themselves). Register it last
    (innermost), so other interceptors see the rejection like any other error.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return cast("grpc.RpcMethodHandler[Any, Any]", handler)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cast("grpc.RpcMethodHandler[Any, Any]", cached[1])
        wrapped = self._wrap(handler)
        self._wrapped[method] = (handler, wrapped)
        return cast("grpc.RpcMethodHandler[Any, Any]", wrapped)

    @staticmethod
    def _wrap(handler: Any) -> Any:
        deserializer = _lenient(handler.request_deserializer)
        own = handler.unary_unary or handler.unary_stream
        if getattr(own, REJECTS_MALFORMED, False):  # the broker's own handlers
            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary is not None
                    else grpc.unary_stream_rpc_method_handler)
            return make(own, request_deserializer=deserializer,
                        response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserializer,
                response_serializer=handler.response_serializer)
        stream = handler.unary_stream
        if inspect.isasyncgenfunction(stream):

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                async for item in stream(request, context):
                    yield item

            behavior_stream: Any = unary_stream
        else:  # a coroutine writing with context.write (grpc.health.v1 Watch)

            async def unary_stream_writer(request: Any, context: Any) -> Any:
                if isinstance(request, _Malformed):
                    await _reject(context, request)
                return await stream(request, context)

            behavior_stream = unary_stream_writer
        return grpc.unary_stream_rpc_method_handler(
            behavior_stream, request_deserializer=deserializer,
            response_serializer=handler.response_serializer)
