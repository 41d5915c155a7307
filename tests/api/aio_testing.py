"""Drive grpc.aio servicers through grpcio-testing.

grpcio-testing calls each handler as a plain function on a thread of its own
(it has no grpc.aio support: grpc/grpc#24942), so a coroutine handler would come
back unawaited. `AioServicer` hands each call to the test's event loop and waits
for it on that thread; `AioContext` gives the handler the grpc.aio context
methods it awaits. `abort_with_status` becomes code, details and trailing
metadata set on grpcio-testing's context, since its own `abort` drops trailing
metadata (the rich error details).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc
import grpc_testing
from google.protobuf.descriptor import ServiceDescriptor


class AioContext:
    """The grpc.aio ServicerContext methods a handler awaits, over a sync one."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self._context.set_trailing_metadata(status.trailing_metadata)
        self._context.set_code(status.code)
        self._context.set_details(status.details)
        raise grpc.aio.AbortError()

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> NoReturn:
        await self.abort_with_status(Status(code, details, tuple(trailing_metadata)))


class Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class AioServicer:
    """A sync view of an aio servicer's unary methods: each call runs on `loop`
    and is waited for on grpcio-testing's thread. (The streaming methods are tested
    with a fake context: StreamStatus's tests need to interleave the stream with
    publishing on the same loop.)"""

    def __init__(self, servicer: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(self._servicer, name)
        loop = self._loop

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            call = asyncio.run_coroutine_threadsafe(method(request, AioContext(context)), loop)
            try:
                return call.result()
            except grpc.aio.AbortError:
                return None  # code, details and trailers are set on the context

        return unary


class Rpcs:
    """Invoke a service's methods by name on a grpcio-testing server.

    Its clock is fake and stands still, so a handler sees exactly the deadline a
    test set, however loaded the machine is."""

    def __init__(self, service: ServiceDescriptor, servicer: Any) -> None:
        self._service = service
        self._server = grpc_testing.server_from_dictionary(
            {service: AioServicer(servicer, asyncio.get_running_loop())},
            grpc_testing.strict_fake_time(time.time()))

    async def unary(self, method: str, request: Any, *, timeout: float | None = None,
                    metadata: tuple[tuple[str, str], ...] = ()
                    ) -> tuple[Any, Any, grpc.StatusCode, str]:
        """(response, trailing metadata, code, details), as a client would see them."""
        rpc = self._server.invoke_unary_unary(
            self._service.methods_by_name[method], metadata, request, timeout)
        return await asyncio.to_thread(rpc.termination)
