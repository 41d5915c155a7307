"""Async client for the session broker (grpc.aio).

Retries, deadlines and idempotency live here once; :mod:`broker_client.sync`
drives this same class from a background event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from . import content as contents
from .batch import BatchSend
from .coalesce import SendStream, StreamUnsupported
from .content import SendOptions
from .errors import (
    BrokerError,
    DeadlineExceeded,
    ErrorReason,
    Unavailable,
    error_from_rpc,
    reason_name,
)
from .retry import is_retryable, send_retrying, stream_retrying
from .v1 import broker_pb2, broker_pb2_grpc

__all__ = [
    "DEFAULT_TARGET", "BrokerClient", "InboundReceiver", "Message", "SendResult",
    "StatusWatch", "tls_credentials",
]

DEFAULT_TARGET = "127.0.0.1:50051"

#: The broker never ends a live stream on its own: one that ends is a restart.
_STREAM_ENDED = reason_name(ErrorReason.STREAM_ENDED)

_Resp = TypeVar("_Resp")
_Msg = TypeVar("_Msg", broker_pb2.StatusEvent, broker_pb2.InboundMessage, broker_pb2.MessageUpdate)
_StatusCall = grpc.aio.UnaryStreamCall[broker_pb2.StreamStatusRequest, broker_pb2.StatusEvent]
_ReceiveCall = grpc.aio.UnaryStreamCall[broker_pb2.ReceiveRequest, broker_pb2.InboundMessage]
_UpdatesCall = grpc.aio.UnaryStreamCall[broker_pb2.ReceiveRequest, broker_pb2.MessageUpdate]


def tls_credentials(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: trust ``ca`` (default: system roots) and,
    for mutual TLS, present ``cert`` with ``key``."""
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def _ts(message: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return message.ToDatetime(tzinfo=UTC) if present else None


@dataclass(frozen=True)
class SendResult:
    """Outcome of :meth:`BrokerClient.send`, with plain Python types."""

    message_id: str
    acked: bool
    duplicate: bool
    sequence: int
    accepted_at: datetime | None
    acked_at: datetime | None

    @classmethod
    def from_response(cls, response: broker_pb2.SendResponse) -> SendResult:
        return cls(
            message_id=response.message_id,
            acked=response.status == broker_pb2.ACKED,
            duplicate=response.duplicate,
            sequence=response.sequence,
            accepted_at=_ts(response.accepted_at, response.HasField("accepted_at")),
            acked_at=_ts(response.acked_at, response.HasField("acked_at")),
        )


@dataclass(frozen=True)
class Message:
    """One message of :meth:`BrokerClient.send_many`."""

    session_id: str
    to: str
    body: str
    #: Makes retries safe (default: a fresh one, as :meth:`BrokerClient.send` does).
    idempotency_key: str | None = None


class BrokerClient:
    """Async broker client; every method raises :class:`BrokerError` subclasses only.

    The channel is created lazily on first use (inside the running loop), so
    constructing a client is cheap and safe outside a coroutine.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 10.0,
        retry_attempts: int = 5,
        reconnect_attempts: int = 10,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        channel: grpc.aio.Channel | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        coalesce: bool = True,
    ) -> None:
        """``token``: a bearer token; ``tls_ca``: PEM CA to trust (TLS); ``tls_cert`` and
        ``tls_key``: this client's PEM certificate and key (mutual TLS). Any ``tls_*``
        switches the channel to TLS (system roots without ``tls_ca``). ``coalesce``:
        carry concurrent :meth:`send` calls on one SendStream call (the default; each
        message keeps unary Send's guarantees); False sends each with unary Send."""
        if tls_ca or tls_cert or tls_key:
            if credentials is not None:
                raise ValueError("pass either credentials or tls_ca/tls_cert/tls_key, not both")
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self.target = target
        self.timeout = timeout
        self.retry_attempts = retry_attempts
        self.reconnect_attempts = reconnect_attempts
        self._credentials = credentials
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._channel = channel
        self._owns_channel = channel is None
        self._stub_cache: broker_pb2_grpc.BrokerAsyncStub | None = None
        self.coalesce = coalesce
        self._stream: SendStream | None = None
        self._no_batch = False

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> BrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if we created it (a caller's channel stays theirs)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()
        channel, self._channel, self._stub_cache = self._channel, None, None
        if channel is not None and self._owns_channel:
            await channel.close(grace=None)

    def with_token(self, token: str | None) -> BrokerClient:
        """A client on this client's channel that calls with ``token`` instead.

        For a service acting for several people (the dashboard, one signed-in
        token per tab): one channel, each call authorized as its caller. ``None``
        keeps this client's own token. Closing the returned client leaves the
        channel open; it lives as long as this client.
        """
        self._stub  # noqa: B018  (opens the channel to share)
        other = BrokerClient(self.target, timeout=self.timeout,
                             retry_attempts=self.retry_attempts,
                             reconnect_attempts=self.reconnect_attempts, channel=self._channel)
        if token is None:
            other._metadata = self._metadata
        else:
            other._metadata = (("authorization", f"Bearer {token}"),)
        return other

    @property
    def _stub(self) -> broker_pb2_grpc.BrokerAsyncStub:
        if self._stub_cache is None:
            if self._channel is None:
                if not self._owns_channel:
                    raise BrokerError("client is closed", code=grpc.StatusCode.CANCELLED)
                options = [("grpc.max_receive_message_length", contents.MAX_MESSAGE_BYTES),
                           ("grpc.max_send_message_length", contents.MAX_MESSAGE_BYTES)]
                self._channel = (
                    grpc.aio.secure_channel(self.target, self._credentials, options)
                    if self._credentials is not None
                    else grpc.aio.insecure_channel(self.target, options)
                )
            self._stub_cache = broker_pb2_grpc.BrokerStub(self._channel)
        return self._stub_cache

    # -- call helpers ----------------------------------------------------------

    async def _call(
        self,
        method: Callable[..., Awaitable[_Resp]],
        request: object,
        deadline_s: float | None = None,
    ) -> _Resp:
        """One attempt, decoded errors."""
        try:
            return await method(
                request,
                timeout=self.timeout if deadline_s is None else deadline_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    async def _call_retrying(
        self,
        method: Callable[..., Awaitable[_Resp]],
        request: object,
        budget_s: float | None = None,
    ) -> _Resp:
        """Retry UNAVAILABLE within ``budget_s`` in total; each attempt gets what is left.

        The first attempt runs before any retry state is built: that set-up cost a
        sixth of a busy sender's CPU (docs/benchmarks.md), for calls that nearly
        always succeed at once. A retryable failure is replayed to tenacity as its
        first attempt, so the policy (attempts, budget, backoff) is unchanged."""
        budget = self.timeout if budget_s is None else budget_s
        deadline = time.monotonic() + budget
        try:
            return await self._call(method, request, budget)
        except BrokerError as err:
            if not is_retryable(err):
                raise
            first: BrokerError | None = err
        last: BrokerError | None = first
        async for attempt in send_retrying(attempts=self.retry_attempts, budget=budget):
            with attempt:
                if first is not None:
                    replay, first = first, None
                    raise replay
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise last or DeadlineExceeded(f"retry budget of {budget}s exhausted")
                try:
                    return await self._call(method, request, remaining)
                except DeadlineExceeded:
                    if last is not None and last.code == grpc.StatusCode.UNAVAILABLE:
                        # The budget ran out mid-retry: what the broker last said (e.g.
                        # "queued, not acked yet") tells the caller more than a timeout.
                        raise last from None
                    raise
                except BrokerError as err:
                    last = err
                    raise
        raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover

    # -- sending ---------------------------------------------------------------

    async def send(
        self,
        session_id: str,
        to: str,
        body: str = "",
        *,
        content: broker_pb2.Content | None = None,
        idempotency_key: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> SendResult:
        """Send a message; retries UNAVAILABLE with one idempotency key so it never sends twice.

        ``content`` (see :mod:`broker_client.content`, or the ``send_image`` ...
        helpers): media, a location, a reaction, a quote or mentions; without
        it ``body`` is a text message. ``timeout`` is the total budget across
        retries (default: the client's). Raises :class:`NotDeliveredYet` if the
        message is queued but unacked when the budget runs out: call again with
        the same key to learn its fate.
        """
        request = broker_pb2.SendRequest(
            session_id=session_id,
            to=to,
            body=body,
            idempotency_key=idempotency_key or str(uuid.uuid4()),
            no_wait=not wait,
            content=content,
        )
        method = self._send_on_stream if self.coalesce else self._stub.Send
        response = await self._call_retrying(method, request, timeout)
        return SendResult.from_response(response)

    # typed content helpers: each is send() with one kind of content

    async def send_text(self, session_id: str, to: str, body: str, *, reply_to: str = "",
                        mentions: Sequence[str] = (),
                        **options: Unpack[SendOptions]) -> SendResult:
        """Text that quotes ``reply_to`` (a message id) and/or mentions addresses."""
        content = contents.text(body, reply_to=reply_to, mentions=mentions)
        return await self.send(session_id, to, content=content, **options)

    async def send_image(self, session_id: str, to: str, data: bytes,
                         mime_type: str = "image/jpeg", *, caption: str = "",
                         reply_to: str = "", mentions: Sequence[str] = (),
                         **options: Unpack[SendOptions]) -> SendResult:
        content = contents.image(data, mime_type, caption=caption, reply_to=reply_to,
                                 mentions=mentions)
        return await self.send(session_id, to, content=content, **options)

    async def send_video(self, session_id: str, to: str, data: bytes,
                         mime_type: str = "video/mp4", *, caption: str = "",
                         reply_to: str = "", mentions: Sequence[str] = (),
                         **options: Unpack[SendOptions]) -> SendResult:
        content = contents.video(data, mime_type, caption=caption, reply_to=reply_to,
                                 mentions=mentions)
        return await self.send(session_id, to, content=content, **options)

    async def send_audio(self, session_id: str, to: str, data: bytes,
                         mime_type: str = "audio/ogg; codecs=opus", *, voice: bool = False,
                         reply_to: str = "", **options: Unpack[SendOptions]) -> SendResult:
        """Audio; ``voice=True`` sends it as a voice note."""
        content = contents.audio(data, mime_type, voice=voice, reply_to=reply_to)
        return await self.send(session_id, to, content=content, **options)

    async def send_document(self, session_id: str, to: str, data: bytes, mime_type: str,
                            file_name: str, *, caption: str = "", reply_to: str = "",
                            mentions: Sequence[str] = (),
                            **options: Unpack[SendOptions]) -> SendResult:
        content = contents.document(data, mime_type, file_name, caption=caption,
                                    reply_to=reply_to, mentions=mentions)
        return await self.send(session_id, to, content=content, **options)

    async def send_sticker(self, session_id: str, to: str, data: bytes,
                           mime_type: str = "image/webp", *, reply_to: str = "",
                           **options: Unpack[SendOptions]) -> SendResult:
        content = contents.sticker(data, mime_type, reply_to=reply_to)
        return await self.send(session_id, to, content=content, **options)

    async def send_location(self, session_id: str, to: str, latitude: float, longitude: float,
                            *, name: str = "", address: str = "", reply_to: str = "",
                            **options: Unpack[SendOptions]) -> SendResult:
        content = contents.location(latitude, longitude, name=name, address=address,
                                    reply_to=reply_to)
        return await self.send(session_id, to, content=content, **options)

    async def send_reaction(self, session_id: str, to: str, message_id: str, emoji: str, *,
                            from_me: bool = False,
                            **options: Unpack[SendOptions]) -> SendResult:
        """React to ``message_id`` in the chat ``to`` ("" removes the reaction)."""
        content = contents.reaction(message_id, emoji, from_me=from_me)
        return await self.send(session_id, to, content=content, **options)

    async def send_presence(self, session_id: str, chat: str, presence: str | int) -> None:
        """Show ``chat`` that the session is "composing" (typing…), "recording",
        "paused" or "available". Best effort: not queued, never retried (a stale
        "typing…" is worse than none); UNAVAILABLE when the session is not open."""
        request = broker_pb2.SendPresenceRequest(
            session_id=session_id, chat=chat, presence=contents.presence(presence))
        await self._call(self._stub.SendPresence, request)

    async def send_many(
        self, messages: Sequence[Message], *, wait: bool = True, timeout: float | None = None
    ) -> list[SendResult | BrokerError]:
        """Send many messages at once: each one's result, or the error :meth:`send` would
        have raised for it (returned, not raised), in the order given. Messages of one
        session are queued in that order; each is retried as :meth:`send` retries.
        Without coalescing they go in SendBatch calls (unary Sends would reach the
        broker in no set order); a broker without SendBatch gets unary Sends."""
        if not self.coalesce and not self._no_batch and messages:
            batched = await self._send_batched(messages, wait=wait, timeout=timeout)
            if batched is not None:
                return batched
            self._no_batch = True  # an older broker: unary Sends from now on

        async def one(message: Message) -> SendResult | BrokerError:
            try:
                return await self.send(message.session_id, message.to, message.body,
                                       idempotency_key=message.idempotency_key, wait=wait,
                                       timeout=timeout)
            except BrokerError as err:
                return err

        # Tasks start in order and each queues its message before it first waits.
        return list(await asyncio.gather(*(one(m) for m in messages)))

    async def _send_batched(
        self, messages: Sequence[Message], *, wait: bool, timeout: float | None
    ) -> list[SendResult | BrokerError] | None:
        """send_many() on SendBatch; None when the broker has none (an older release)."""
        batch = BatchSend(self._stub, [
            broker_pb2.SendRequest(session_id=m.session_id, to=m.to, body=m.body,
                                   idempotency_key=m.idempotency_key or str(uuid.uuid4()),
                                   no_wait=not wait)
            for m in messages])
        error: BrokerError | None = None
        try:
            await self._call_retrying(batch.attempt, None, timeout)
        except BrokerError as err:
            if err.code == grpc.StatusCode.UNIMPLEMENTED and \
                    all(o is None for o in batch.outcomes):
                return None
            error = err
        return [o if isinstance(o, BrokerError) else SendResult.from_response(o)
                for o in batch.settle(error)]

    async def _send_on_stream(
        self, request: broker_pb2.SendRequest, *, timeout: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> broker_pb2.SendResponse:
        """One attempt on the shared SendStream; unary Send on a broker without it."""
        if self._stream is None:
            self._stream = SendStream(self._stub, metadata)
        try:
            return await self._stream.send(request, timeout)
        except StreamUnsupported as err:
            if err.permanent:  # an older broker: unary Send from now on
                self.coalesce = False
            return await self._stub.Send(request, timeout=timeout, metadata=metadata)

    # -- status ----------------------------------------------------------------

    def watch_status(
        self,
        session_ids: Sequence[str] = (),
        tenant: str = "",
        *,
        resume_after: str = "",
    ) -> StatusWatch:
        """Live status events that survive broker restarts and slow-subscriber drops."""
        return StatusWatch(self, list(session_ids), tenant, resume_after)

    async def health(
        self, session_ids: Sequence[str] = (), tenant: str = ""
    ) -> list[broker_pb2.SessionHealth]:
        return list((await self.health_report(session_ids, tenant)).sessions)

    async def health_report(
        self, session_ids: Sequence[str] = (), tenant: str = ""
    ) -> broker_pb2.HealthResponse:
        """The whole Health answer: the sessions, plus the answering instance's engine
        (up or not) and the store's durability."""
        request = broker_pb2.HealthRequest(session_ids=list(session_ids), tenant=tenant)
        response: broker_pb2.HealthResponse = await self._call_retrying(self._stub.Health,
                                                                         request)
        return response

    # -- inbound -----------------------------------------------------------------

    def receive(
        self,
        session_ids: Sequence[str],
        *,
        group: str = "default",
        consumer: str = "",
        max_unacked: int = 100,
    ) -> InboundReceiver:
        """Inbound messages for this worker of ``group``; acknowledge each with :meth:`ack_inbound`.

        At-least-once: a message not acknowledged in time (e.g. this worker died)
        is delivered again, to this or another worker of the group, with a higher
        ``delivery_count``. Reconnects on ``UNAVAILABLE``; nothing needs resuming,
        since unacknowledged messages come back by themselves.
        """
        return InboundReceiver(self, list(session_ids), group, consumer, max_unacked)

    async def ack_inbound(
        self, session_id: str, inbound_ids: Sequence[str], group: str = "default"
    ) -> int:
        """Acknowledge messages for ``group``; returns how many were still pending.

        Idempotent, so ``UNAVAILABLE`` is retried.
        """
        request = broker_pb2.AckInboundRequest(
            session_id=session_id, group=group, inbound_ids=list(inbound_ids)
        )
        response = await self._call_retrying(self._stub.AckInbound, request)
        return response.acked

    def receive_updates(
        self,
        session_ids: Sequence[str],
        *,
        group: str = "default",
        consumer: str = "",
        max_unacked: int = 100,
    ) -> UpdateReceiver:
        """Status updates of sent messages (server ack, delivered, read, played,
        refused) for this worker of ``group``, in order per message; acknowledge each
        with :meth:`ack_updates`. At least once, like :meth:`receive`."""
        return UpdateReceiver(self, list(session_ids), group, consumer, max_unacked)

    async def ack_updates(
        self, session_id: str, update_ids: Sequence[str], group: str = "default"
    ) -> int:
        """Acknowledge status updates for ``group``; idempotent, so retried."""
        request = broker_pb2.AckUpdatesRequest(
            session_id=session_id, group=group, update_ids=list(update_ids)
        )
        response = await self._call_retrying(self._stub.AckUpdates, request)
        return response.acked

    async def get_message(self, session_id: str, message_id: str) -> broker_pb2.MessageInfo:
        """How far a sent message got (``status``, ``status_at``); raises
        :class:`SessionNotFound` (reason ``MESSAGE_NOT_FOUND``) once it is no longer kept."""
        request = broker_pb2.GetMessageRequest(session_id=session_id, message_id=message_id)
        return await self._call_retrying(self._stub.GetMessage, request)

    async def download_media(self, session_id: str, message_id: str) -> bytes:
        """The bytes of an inbound message's medium (``message_id``: its
        ``upstream_id``; its ``content.media`` has the MIME type and size). Raises
        :class:`SessionNotFound` (reason ``MEDIA_NOT_FOUND``) when it is not kept and
        :class:`FailedPrecondition` (``MEDIA_UNAVAILABLE``) when it could not be."""
        request = broker_pb2.DownloadMediaRequest(session_id=session_id, message_id=message_id)

        async def read(request: broker_pb2.DownloadMediaRequest, *, timeout: float,
                       metadata: Any) -> bytes:
            parts = [chunk.data async for chunk in self._stub.DownloadMedia(
                request, timeout=timeout, metadata=metadata)]
            return b"".join(parts)

        return await self._call_retrying(read, request)

    # -- session admin -----------------------------------------------------------
    # Reads and the idempotent CreateSession retry UNAVAILABLE; mutations that
    # are not safe to repeat blindly (stop/logout/restart/delete) do not.

    async def create_session(
        self, session_id: str, tenant: str = "", *, start: bool = True
    ) -> broker_pb2.Session:
        request = broker_pb2.CreateSessionRequest(
            session_id=session_id, tenant=tenant, no_start=not start
        )
        return await self._call_retrying(self._stub.CreateSession, request)

    async def get_session(self, session_id: str) -> broker_pb2.Session:
        request = broker_pb2.GetSessionRequest(session_id=session_id)
        return await self._call_retrying(self._stub.GetSession, request)

    async def list_sessions(self, tenant: str = "") -> list[broker_pb2.Session]:
        request = broker_pb2.ListSessionsRequest(tenant=tenant)
        response = await self._call_retrying(self._stub.ListSessions, request)
        return list(response.sessions)

    async def stop_session(self, session_id: str) -> broker_pb2.Session:
        ref = broker_pb2.SessionRef(session_id=session_id)
        return await self._call(self._stub.StopSession, ref)

    async def logout_session(self, session_id: str) -> broker_pb2.Session:
        ref = broker_pb2.SessionRef(session_id=session_id)
        return await self._call(self._stub.LogoutSession, ref)

    async def restart_session(self, session_id: str) -> broker_pb2.Session:
        ref = broker_pb2.SessionRef(session_id=session_id)
        return await self._call(self._stub.RestartSession, ref)

    async def delete_session(self, session_id: str) -> None:
        ref = broker_pb2.SessionRef(session_id=session_id)
        await self._call(self._stub.DeleteSession, ref)

    async def get_qr(self, session_id: str) -> broker_pb2.QrCode:
        return await self._call_retrying(
            self._stub.GetQr, broker_pb2.SessionRef(session_id=session_id)
        )

    async def request_pairing_code(self, session_id: str, phone_number: str) -> str:
        """The 8-character code to type into the phone while the session is pairing
        (instead of scanning the QR). Not retried: each call asks for a new code."""
        request = broker_pb2.RequestPairingCodeRequest(
            session_id=session_id, phone_number=phone_number
        )
        response = await self._call(self._stub.RequestPairingCode, request)
        return response.code


class _ReconnectingStream(AsyncIterator[_Msg]):
    """A server stream read one tenacity-governed step at a time.

    A failed read (UNAVAILABLE, SUBSCRIBER_TOO_SLOW, or the stream ending
    under us) reopens the stream after a backoff; every item delivered starts
    a fresh retry budget, so the attempt bound applies per outage, not per
    stream. Any error that escapes (including cancelling a pending read)
    closes the stream. Subclasses say how to open it and what it yields.
    """

    #: What the stream carries, for the message when the broker ends it.
    _what: str
    _message_type: type[_Msg]

    def __init__(self, client: BrokerClient) -> None:
        self._client = client
        #: How many times the stream was reopened after a failure.
        self.reconnects = 0
        self._call: grpc.aio.UnaryStreamCall[Any, _Msg] | None = None
        self._opened_once = False
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    def _start(self) -> grpc.aio.UnaryStreamCall[Any, _Msg]:
        """Open the stream (again), from where the reader is."""
        raise NotImplementedError

    def _delivered(self, item: _Msg) -> None:
        """Called with each item handed out."""

    def _open(self) -> grpc.aio.UnaryStreamCall[Any, _Msg]:
        if self._opened_once:
            self.reconnects += 1
        self._opened_once = True
        return self._start()

    def _drop(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()

    async def _read_once(self) -> _Msg:
        if self._call is None:
            self._call = self._open()
        try:
            item = await self._call.read()
        except grpc.RpcError as err:
            self._drop()
            raise error_from_rpc(err) from err
        if not isinstance(item, self._message_type):  # grpc.aio.EOF
            self._drop()
            # The broker never ends a live stream on its own: this is a restart.
            raise Unavailable(f"{self._what} stream ended by the broker", reason=_STREAM_ENDED)
        return item

    async def __anext__(self) -> _Msg:
        if self._closed:
            raise StopAsyncIteration
        item: _Msg | None = None
        try:
            async for attempt in stream_retrying(attempts=self._client.reconnect_attempts):
                with attempt:
                    item = await self._read_once()
        except BaseException:
            await self.aclose()
            raise
        assert item is not None
        self._delivered(item)
        return item

    async def aclose(self) -> None:
        """Cancel the underlying stream; further iteration stops."""
        self._closed = True
        self._drop()


class StatusWatch(_ReconnectingStream[broker_pb2.StatusEvent]):
    """Resumable status stream: reopened with ``resume_after = last_event_id``,
    so nothing is missed (see :class:`_ReconnectingStream` for the retries)."""

    _what = "status"
    _message_type = broker_pb2.StatusEvent

    def __init__(
        self, client: BrokerClient, session_ids: list[str], tenant: str, resume_after: str
    ) -> None:
        super().__init__(client)
        self._session_ids = session_ids
        self._tenant = tenant
        #: ``event_id`` of the last event handed out; pass it to resume elsewhere.
        self.last_event_id = resume_after

    def _start(self) -> _StatusCall:
        request = broker_pb2.StreamStatusRequest(
            session_ids=self._session_ids, tenant=self._tenant, resume_after=self.last_event_id
        )
        return self._client._stub.StreamStatus(request, metadata=self._client._metadata)

    def _delivered(self, item: broker_pb2.StatusEvent) -> None:
        if item.event_id:
            self.last_event_id = item.event_id


class _GroupStream(_ReconnectingStream[_Msg]):
    """A consumer group's stream (Receive, ReceiveUpdates): one request, no cursor."""

    def __init__(
        self, client: BrokerClient, session_ids: list[str], group: str, consumer: str,
        max_unacked: int,
    ) -> None:
        super().__init__(client)
        self._request = broker_pb2.ReceiveRequest(
            session_ids=session_ids, group=group, consumer=consumer, max_unacked=max_unacked
        )


class UpdateReceiver(_GroupStream[broker_pb2.MessageUpdate]):
    """Reconnecting status-update stream (see :meth:`BrokerClient.receive_updates`)."""

    _what = "updates"
    _message_type = broker_pb2.MessageUpdate

    def _start(self) -> _UpdatesCall:
        return self._client._stub.ReceiveUpdates(self._request,
                                                 metadata=self._client._metadata)


class InboundReceiver(_GroupStream[broker_pb2.InboundMessage]):
    """Reconnecting inbound stream (see :meth:`BrokerClient.receive`).

    Nothing is resumed by cursor: what this worker had not acknowledged is
    redelivered by the broker, to it or to another worker of the group, so
    closing it (``aclose``) hands unacknowledged messages on.
    """

    _what = "inbound"
    _message_type = broker_pb2.InboundMessage

    def _start(self) -> _ReceiveCall:
        return self._client._stub.Receive(self._request, metadata=self._client._metadata)
