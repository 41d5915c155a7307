"""``send_many()`` without the stream: SendBatch calls, which queue items in list order.

Concurrent unary Sends reach the broker's handlers in no set order (gRPC orders
nothing between calls), so a client that does not coalesce sends a list with
SendBatch instead: the broker places each session's items in the order of the
list. One attempt sends what is still pending, in requests of up to
``BATCH_BYTES``, and stops after the first request with an item that failed in
a way worth retrying (UNAVAILABLE), so that later items of its session do not
overtake it; the caller's retry policy then sends the pending items again,
with the same keys.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .coalesce import BATCH_BYTES
from .errors import BrokerError, error_from_send_error
from .retry import is_retryable
from .v1 import broker_pb2, broker_pb2_grpc

__all__ = ["BatchSend"]


class BatchSend:
    """The items of one ``send_many()`` and what the broker has answered for each."""

    def __init__(self, stub: broker_pb2_grpc.BrokerAsyncStub,
                 requests: Sequence[broker_pb2.SendRequest]) -> None:
        self._stub = stub
        self._requests = list(requests)
        #: Per item: the broker's answer, the last error, or None (never answered).
        self.outcomes: list[broker_pb2.SendResponse | BrokerError | None] = \
            [None] * len(self._requests)
        #: Items still to send, in list order.
        self.pending: list[int] = list(range(len(self._requests)))

    async def attempt(self, _request: object, *, timeout: float,
                      metadata: tuple[tuple[str, str], ...]) -> None:
        """Send the pending items (a stub method's signature, for the client's retry
        policy). Raises the first retryable item error while any item is left to retry,
        or the call's own error (its items stay pending)."""
        deadline = time.monotonic() + timeout
        left = self.pending
        start = 0
        while start < len(left):
            chunk = self._chunk(left, start)
            remaining = max(deadline - time.monotonic(), 1e-3)
            # No item deadline: each waits what the call has left, less the broker's
            # margin to answer, as a unary Send does.
            request = broker_pb2.SendBatchRequest(items=[
                broker_pb2.SendItem(ref=i, request=self._requests[i]) for i in chunk])
            try:
                response = await self._stub.SendBatch(request, timeout=remaining,
                                                      metadata=metadata)
            except BaseException:
                self.pending = left[start:]
                raise
            start += len(chunk)
            retry: list[int] = []
            first: BrokerError | None = None
            for result in response.results:
                if result.WhichOneof("outcome") == "error":
                    error = error_from_send_error(result.error)
                    self.outcomes[result.ref] = error
                    if is_retryable(error):
                        retry.append(result.ref)
                        first = first or error
                else:
                    self.outcomes[result.ref] = result.response
            if first is not None:
                self.pending = retry + left[start:]
                raise first
        self.pending = []

    def _chunk(self, left: list[int], start: int) -> list[int]:
        chunk, size = [left[start]], self._requests[left[start]].ByteSize()
        for n in range(start + 1, len(left)):
            i = left[n]
            size += self._requests[i].ByteSize()
            if size > BATCH_BYTES:
                break
            chunk.append(i)
        return chunk

    def settle(self, error: BrokerError | None) -> list[broker_pb2.SendResponse | BrokerError]:
        """Every item's outcome once retrying stopped, with ``error`` (None: it ended
        with every item answered): an item never answered takes the error; one that
        was keeps what the broker last said about it."""
        settled: list[broker_pb2.SendResponse | BrokerError] = []
        for outcome in self.outcomes:
            if outcome is None:
                if error is None:
                    raise AssertionError("an item was never answered")  # pragma: no cover
                outcome = error
            settled.append(outcome)
        return settled
