"""Shared plumbing of the hostile-input tests.

Hypothesis drives plain (sync) test functions, while the broker, the simulator
and the gRPC client all live on one asyncio loop in a background thread that
outlives the examples. Every wait is bounded, so a hung broker fails a test
instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

T = TypeVar("T")

#: Codes the broker must never answer with, whatever it is sent.
NEVER = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
#: Codes the broker itself decides; each must carry an ErrorInfo in domain broker.v1.
RICH = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
})


class LoopThread:
    """An event loop running forever in a daemon thread; `run` a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self._thread = threading.Thread(target=self._main, name="hostile-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class ErrorLog(logging.Handler):
    """Collects ERROR records of the broker's loggers: a caught bug still is a bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ErrorLog:
        logging.getLogger("broker").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("broker").removeHandler(self)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()} {r.exc_info[1] if r.exc_info else ''}"
               for r in self.records]
        self.records.clear()
        return out


@dataclass
class Outcome:
    """What one call got back: a status code, its ErrorInfo and any response bytes."""

    code: grpc.StatusCode
    details: str = ""
    reason: str | None = None
    domain: str | None = None
    responses: list[bytes] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.code.name} reason={self.reason} details={self.details[:300]!r}"


def _outcome(err: grpc.aio.AioRpcError) -> Outcome:
    out = Outcome(err.code(), err.details() or "")
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except ValueError:
        status = None
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                out.reason, out.domain = info.reason, info.domain
    return out


async def call_unary(
    channel: grpc.aio.Channel, method: str, raw: bytes, timeout: float | None
) -> Outcome:
    """Call a unary method with raw (maybe not even protobuf) request bytes."""
    callable_ = channel.unary_unary(method, None, None)  # no serializers: raw bytes
    try:
        response = await callable_(raw, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        return _outcome(err)
    assert isinstance(response, bytes)
    return Outcome(grpc.StatusCode.OK, responses=[response])


async def call_stream(
    channel: grpc.aio.Channel, method: str, raw: bytes, timeout: float, *, take: int = 1
) -> Outcome:
    """Read up to `take` messages of a server stream, then cancel it.

    A stream that stays open without sending ends with DEADLINE_EXCEEDED.
    """
    call = channel.unary_stream(method, None, None)(raw, timeout=timeout)
    got: list[bytes] = []
    try:
        while len(got) < take:
            item = await call.read()
            if item is grpc.aio.EOF:  # type: ignore[attr-defined]
                break
            assert isinstance(item, bytes)
            got.append(item)
    except grpc.aio.AioRpcError as err:
        out = _outcome(err)
        out.responses = got
        return out
    finally:
        call.cancel()
    return Outcome(grpc.StatusCode.OK, responses=got)


def check_outcome(out: Outcome, allowed: frozenset[grpc.StatusCode], what: str) -> None:
    assert out.code not in NEVER, f"{what}: the broker answered {out.describe()}"
    assert out.code in allowed, f"{what}: unexpected {out.describe()}"
    if out.code in RICH:
        assert out.domain == "broker.v1" and out.reason, (
            f"{what}: {out.code.name} without an ErrorInfo in domain broker.v1 "
            f"({out.describe()})"
        )
