"""Concurrent ``send()`` calls of one client, coalesced onto one SendStream call.

A unary Send costs a whole gRPC call per message (headers, a stream, its
own HTTP/2 frames, a task on each side); on the stream, the messages queued by
the time it can write travel in one request, the results that finished
together come back in one response, and the broker writes each session's
messages in shared batches.
Each message keeps what a unary Send gives it (its key, its deadline, its
typed error, FIFO per session in the order calls were made), so callers see no
difference but speed. A broken stream fails the items it carried with
UNAVAILABLE, which ``send()`` retries with the same keys on a new stream; a
broker without SendStream (UNIMPLEMENTED) makes the client use unary Send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from .errors import (
    DeadlineExceeded,
    Unavailable,
    error_from_rpc,
    error_from_send_error,
)
from .v1 import broker_pb2, broker_pb2_grpc

__all__ = ["SendStream", "StreamUnsupported"]

#: A request of the stream carries items up to this size together (each item alone may
#: be larger, up to the message size limit): a few media must not add up past it.
BATCH_BYTES = 1 << 20

#: Extra time the client waits past an item's own deadline for the broker's answer.
_ANSWER_MARGIN_S = 1.0


class StreamUnsupported(Exception):
    """Send this attempt with unary Send: the broker has no SendStream (an older
    release; ``permanent``), or the stream failed before it answered anything."""

    def __init__(self, permanent: bool) -> None:
        super().__init__("SendStream unavailable: use unary Send")
        self.permanent = permanent


_Call = grpc.aio.StreamStreamCall[broker_pb2.SendBatchRequest, broker_pb2.SendBatchResponse]


class _Open:
    """One SendStream call: what it carries and who waits for which ref."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self.outgoing: asyncio.Queue[broker_pb2.SendItem | None] = asyncio.Queue()
        self.waiting: dict[int, asyncio.Future[broker_pb2.SendResult]] = {}
        self.unsupported = False
        self.answered = False
        self.call: _Call = stub.SendStream(self._items(), metadata=metadata)
        self.reader = asyncio.create_task(self._read())

    @property
    def live(self) -> bool:
        return not self.reader.done()

    async def _items(self) -> AsyncIterator[broker_pb2.SendBatchRequest]:
        """Every item queued by the time the stream can write goes in one request, up to
        BATCH_BYTES (a medium alone may be larger): requests stay within the gRPC
        message size limit, whatever media the items carry."""
        carried: broker_pb2.SendItem | None = None
        while (item := carried or await self.outgoing.get()) is not None:
            carried = None
            items, size = [item], item.ByteSize()
            while not self.outgoing.empty():
                more = self.outgoing.get_nowait()
                if more is None:
                    yield broker_pb2.SendBatchRequest(items=items)
                    return
                more_size = more.ByteSize()
                if size + more_size > BATCH_BYTES:
                    carried = more
                    break
                items.append(more)
                size += more_size
            yield broker_pb2.SendBatchRequest(items=items)

    async def _read(self) -> None:
        error: BaseException
        try:
            async for response in self.call:
                self.answered = True
                for result in response.results:
                    answer = self.waiting.pop(result.ref, None)
                    if answer is not None and not answer.done():
                        answer.set_result(result)
            error = Unavailable("the send stream ended")
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unsupported = True
                error = StreamUnsupported(permanent=True)
            elif not self.answered:
                # Refused before any answer (the call never really opened, or a
                # broker ending it as grpc-core reports INTERNAL): each item tries
                # unary Send once, with its key, which says what really happened.
                error = StreamUnsupported(permanent=False)
            else:
                error = error_from_rpc(err)
        except asyncio.CancelledError:
            error = Unavailable("the send stream was closed")
        # What this stream carried and did not answer: its fate is open, and a
        # retry with the same key on the next stream learns it.
        for answer in self.waiting.values():
            if not answer.done():
                answer.set_exception(error)
        self.waiting.clear()

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class SendStream:
    """One SendStream call shared by every concurrent ``send()`` of a client,
    opened on first use and again after it breaks."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub,
                 metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata
        self._refs = itertools.count(1)
        self._open: _Open | None = None
        self.unsupported = False
        #: How many times a stream was opened (for tests and metrics).
        self.opened = 0

    async def send(
        self, request: broker_pb2.SendRequest, timeout: float
    ) -> broker_pb2.SendResponse:
        """One attempt of one message, with ``timeout`` as its deadline; raises the
        same :class:`BrokerError` a unary Send would, StreamUnsupported if none."""
        if self.unsupported:
            raise StreamUnsupported(permanent=True)
        stream = self._open
        if stream is None or not stream.live:
            stream = self._open = _Open(self._stub, self._metadata)
            self.opened += 1
        ref = next(self._refs)
        answer: asyncio.Future[broker_pb2.SendResult] = asyncio.get_running_loop().create_future()
        stream.waiting[ref] = answer
        stream.outgoing.put_nowait(broker_pb2.SendItem(ref=ref, request=request,
                                                       timeout_ms=max(1, int(timeout * 1000))))
        try:
            async with asyncio.timeout(timeout + _ANSWER_MARGIN_S):
                result = await answer
        except TimeoutError:
            raise DeadlineExceeded(f"no answer on the send stream within {timeout:.1f}s") from None
        except StreamUnsupported as err:
            self.unsupported = self.unsupported or err.permanent
            raise
        finally:
            stream.waiting.pop(ref, None)
        if result.HasField("error"):
            raise error_from_send_error(result.error)
        return result.response

    async def close(self) -> None:
        """Half-close the stream and stop reading (unanswered sends fail UNAVAILABLE)."""
        stream, self._open = self._open, None
        if stream is not None:
            await stream.close()
