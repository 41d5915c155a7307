"""Blocking client: a :class:`BrokerClient` driven on a private event loop thread.

Running the async client (rather than a second grpc.Channel implementation)
keeps retries, deadlines and stream resumption in one place.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc

from .client import (
    DEFAULT_TARGET,
    BrokerClient,
    Message,
    SendResult,
    StatusWatch,
    _ReconnectingStream,
)
from .content import SendOptions
from .errors import BrokerError
from .v1 import broker_pb2

__all__ = ["SyncBrokerClient", "SyncInboundReceiver", "SyncStatusWatch", "SyncUpdateReceiver"]

_T = TypeVar("_T")
_Msg = TypeVar("_Msg", broker_pb2.StatusEvent, broker_pb2.InboundMessage, broker_pb2.MessageUpdate)


class SyncBrokerClient:
    """Same methods as :class:`BrokerClient`, blocking; safe to share between threads."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 10.0,
        retry_attempts: int = 5,
        reconnect_attempts: int = 10,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        coalesce: bool = True,
    ) -> None:
        """Options as :class:`BrokerClient` (``tls_*``: PEM files for TLS / mutual TLS).
        With ``coalesce`` (the default), :meth:`send` calls made from many threads at
        once share one SendStream call, as the async client's do."""
        # The async client first: it checks the options (and reads the TLS files)
        # and opens nothing, so bad options fail before the loop thread exists.
        self._client = BrokerClient(
            target, timeout=timeout, retry_attempts=retry_attempts,
            reconnect_attempts=reconnect_attempts, credentials=credentials, token=token,
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, coalesce=coalesce,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run_loop, name="broker-client-loop", daemon=True
        )
        self._thread.start()
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coro.close()
            raise RuntimeError("SyncBrokerClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave the call running
            raise

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> SyncBrokerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread (idempotent)."""
        if self._closed:
            return
        try:
            self._run(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    # -- API -------------------------------------------------------------------

    def send(
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
        return self._run(
            self._client.send(
                session_id, to, body, content=content, idempotency_key=idempotency_key,
                wait=wait, timeout=timeout,
            )
        )

    # the typed content helpers of BrokerClient, blocking

    def send_text(self, session_id: str, to: str, body: str, *, reply_to: str = "",
                  mentions: Sequence[str] = (), **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_text(session_id, to, body, reply_to=reply_to,
                                                mentions=mentions, **options))

    def send_image(self, session_id: str, to: str, data: bytes, mime_type: str = "image/jpeg",
                   *, caption: str = "", reply_to: str = "", mentions: Sequence[str] = (),
                   **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_image(
            session_id, to, data, mime_type, caption=caption, reply_to=reply_to,
            mentions=mentions, **options))

    def send_video(self, session_id: str, to: str, data: bytes, mime_type: str = "video/mp4",
                   *, caption: str = "", reply_to: str = "", mentions: Sequence[str] = (),
                   **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_video(
            session_id, to, data, mime_type, caption=caption, reply_to=reply_to,
            mentions=mentions, **options))

    def send_audio(self, session_id: str, to: str, data: bytes,
                   mime_type: str = "audio/ogg; codecs=opus", *, voice: bool = False,
                   reply_to: str = "", **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_audio(session_id, to, data, mime_type, voice=voice,
                                                 reply_to=reply_to, **options))

    def send_document(self, session_id: str, to: str, data: bytes, mime_type: str,
                      file_name: str, *, caption: str = "", reply_to: str = "",
                      mentions: Sequence[str] = (),
                      **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_document(
            session_id, to, data, mime_type, file_name, caption=caption, reply_to=reply_to,
            mentions=mentions, **options))

    def send_sticker(self, session_id: str, to: str, data: bytes, mime_type: str = "image/webp",
                     *, reply_to: str = "", **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_sticker(session_id, to, data, mime_type,
                                                   reply_to=reply_to, **options))

    def send_location(self, session_id: str, to: str, latitude: float, longitude: float, *,
                      name: str = "", address: str = "", reply_to: str = "",
                      **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_location(
            session_id, to, latitude, longitude, name=name, address=address, reply_to=reply_to,
            **options))

    def send_reaction(self, session_id: str, to: str, message_id: str, emoji: str, *,
                      from_me: bool = False, **options: Unpack[SendOptions]) -> SendResult:
        return self._run(self._client.send_reaction(session_id, to, message_id, emoji,
                                                    from_me=from_me, **options))

    def send_presence(self, session_id: str, chat: str, presence: str | int) -> None:
        self._run(self._client.send_presence(session_id, chat, presence))

    def send_many(
        self, messages: Sequence[Message], *, wait: bool = True, timeout: float | None = None
    ) -> list[SendResult | BrokerError]:
        """As :meth:`BrokerClient.send_many`: each message's result or error, in order."""
        return self._run(self._client.send_many(messages, wait=wait, timeout=timeout))

    def watch_status(
        self, session_ids: Sequence[str] = (), tenant: str = "", *, resume_after: str = ""
    ) -> SyncStatusWatch:
        watch = self._client.watch_status(session_ids, tenant, resume_after=resume_after)
        return SyncStatusWatch(self, watch)

    def health(
        self, session_ids: Sequence[str] = (), tenant: str = ""
    ) -> list[broker_pb2.SessionHealth]:
        return self._run(self._client.health(session_ids, tenant))

    def health_report(
        self, session_ids: Sequence[str] = (), tenant: str = ""
    ) -> broker_pb2.HealthResponse:
        return self._run(self._client.health_report(session_ids, tenant))

    def receive(
        self,
        session_ids: Sequence[str],
        *,
        group: str = "default",
        consumer: str = "",
        max_unacked: int = 100,
    ) -> SyncInboundReceiver:
        receiver = self._client.receive(
            session_ids, group=group, consumer=consumer, max_unacked=max_unacked
        )
        return SyncInboundReceiver(self, receiver)

    def ack_inbound(
        self, session_id: str, inbound_ids: Sequence[str], group: str = "default"
    ) -> int:
        return self._run(self._client.ack_inbound(session_id, inbound_ids, group))

    def receive_updates(
        self,
        session_ids: Sequence[str],
        *,
        group: str = "default",
        consumer: str = "",
        max_unacked: int = 100,
    ) -> SyncUpdateReceiver:
        receiver = self._client.receive_updates(
            session_ids, group=group, consumer=consumer, max_unacked=max_unacked
        )
        return SyncUpdateReceiver(self, receiver)

    def ack_updates(
        self, session_id: str, update_ids: Sequence[str], group: str = "default"
    ) -> int:
        return self._run(self._client.ack_updates(session_id, update_ids, group))

    def get_message(self, session_id: str, message_id: str) -> broker_pb2.MessageInfo:
        return self._run(self._client.get_message(session_id, message_id))

    def download_media(self, session_id: str, message_id: str) -> bytes:
        return self._run(self._client.download_media(session_id, message_id))

    def create_session(
        self, session_id: str, tenant: str = "", *, start: bool = True
    ) -> broker_pb2.Session:
        return self._run(self._client.create_session(session_id, tenant, start=start))

    def get_session(self, session_id: str) -> broker_pb2.Session:
        return self._run(self._client.get_session(session_id))

    def list_sessions(self, tenant: str = "") -> list[broker_pb2.Session]:
        return self._run(self._client.list_sessions(tenant))

    def stop_session(self, session_id: str) -> broker_pb2.Session:
        return self._run(self._client.stop_session(session_id))

    def logout_session(self, session_id: str) -> broker_pb2.Session:
        return self._run(self._client.logout_session(session_id))

    def restart_session(self, session_id: str) -> broker_pb2.Session:
        return self._run(self._client.restart_session(session_id))

    def delete_session(self, session_id: str) -> None:
        self._run(self._client.delete_session(session_id))

    def get_qr(self, session_id: str) -> broker_pb2.QrCode:
        return self._run(self._client.get_qr(session_id))

    def request_pairing_code(self, session_id: str, phone_number: str) -> str:
        return self._run(self._client.request_pairing_code(session_id, phone_number))


class _SyncStream(Iterator[_Msg]):
    """Blocking iteration over one of the async client's streams, run on its loop;
    ``close()`` cancels the stream."""

    def __init__(self, owner: SyncBrokerClient, stream: _ReconnectingStream[_Msg]) -> None:
        self._owner = owner
        self._stream: _ReconnectingStream[_Msg] = stream

    @property
    def reconnects(self) -> int:
        """How many times the stream was reopened after a failure."""
        return self._stream.reconnects

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> _Msg:
        try:
            return self._owner._run(self._next())
        except StopAsyncIteration:
            raise StopIteration from None

    async def _next(self) -> _Msg:
        item: _Msg = await self._stream.__anext__()
        return item

    def close(self) -> None:
        if not self._owner._closed:
            self._owner._run(self._stream.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncStatusWatch(_SyncStream[broker_pb2.StatusEvent]):
    """Blocking view of a :class:`StatusWatch`."""

    def __init__(self, owner: SyncBrokerClient, watch: StatusWatch) -> None:
        super().__init__(owner, watch)
        self._watch = watch

    @property
    def last_event_id(self) -> str:
        return self._watch.last_event_id


class SyncInboundReceiver(_SyncStream[broker_pb2.InboundMessage]):
    """Blocking view of an :class:`InboundReceiver`."""


class SyncUpdateReceiver(_SyncStream[broker_pb2.MessageUpdate]):
    """Blocking view of an :class:`UpdateReceiver`."""
