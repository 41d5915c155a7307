"""Builders of a Send's content (``broker.v1.Content``): media, locations, reactions,
quotes and mentions, so callers need not assemble protobuf messages by hand.

The client's ``send_image`` / ``send_document`` / ... helpers use these; pass one
as ``content=`` to :meth:`BrokerClient.send` for anything they do not cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from .v1 import broker_pb2

__all__ = [
    "MAX_MESSAGE_BYTES", "PRESENCES", "SendOptions", "audio", "document", "image", "location",
    "presence", "reaction", "sticker", "text", "video",
]

MAX_MESSAGE_BYTES = 68 * 1024 * 1024
"""The client's gRPC message size limit: the largest medium a broker accepts
(--max-media-bytes, at most 64 MiB) and room around it."""

PRESENCES = {
    "available": broker_pb2.AVAILABLE, "composing": broker_pb2.COMPOSING,
    "recording": broker_pb2.RECORDING, "paused": broker_pb2.PAUSED,
}


class SendOptions(TypedDict, total=False):
    """What every typed send helper passes on to :meth:`BrokerClient.send`."""

    idempotency_key: str | None
    wait: bool
    timeout: float | None


def _content(reply_to: str, mentions: Sequence[str]) -> broker_pb2.Content:
    return broker_pb2.Content(reply_to=reply_to, mentions=list(mentions))


def text(body: str, *, reply_to: str = "", mentions: Sequence[str] = ()) -> broker_pb2.Content:
    """Text that quotes ``reply_to`` (a message id) and/or mentions addresses."""
    content = _content(reply_to, mentions)
    content.text = body
    return content


def _media(kind: broker_pb2.Media.Kind.ValueType, data: bytes, mime_type: str, caption: str,
           file_name: str, reply_to: str, mentions: Sequence[str]) -> broker_pb2.Content:
    content = _content(reply_to, mentions)
    content.media.CopyFrom(broker_pb2.Media(kind=kind, data=bytes(data), mime_type=mime_type,
                                            caption=caption, file_name=file_name))
    return content


def image(data: bytes, mime_type: str = "image/jpeg", *, caption: str = "", reply_to: str = "",
          mentions: Sequence[str] = ()) -> broker_pb2.Content:
    return _media(broker_pb2.Media.IMAGE, data, mime_type, caption, "", reply_to, mentions)


def video(data: bytes, mime_type: str = "video/mp4", *, caption: str = "", reply_to: str = "",
          mentions: Sequence[str] = ()) -> broker_pb2.Content:
    return _media(broker_pb2.Media.VIDEO, data, mime_type, caption, "", reply_to, mentions)


def audio(data: bytes, mime_type: str = "audio/ogg; codecs=opus", *, voice: bool = False,
          reply_to: str = "") -> broker_pb2.Content:
    """Audio; ``voice=True`` shows it as a recorded voice note."""
    kind = broker_pb2.Media.VOICE_NOTE if voice else broker_pb2.Media.AUDIO
    return _media(kind, data, mime_type, "", "", reply_to, ())


def document(data: bytes, mime_type: str, file_name: str, *, caption: str = "",
             reply_to: str = "", mentions: Sequence[str] = ()) -> broker_pb2.Content:
    return _media(broker_pb2.Media.DOCUMENT, data, mime_type, caption, file_name, reply_to,
                  mentions)


def sticker(data: bytes, mime_type: str = "image/webp", *,
            reply_to: str = "") -> broker_pb2.Content:
    return _media(broker_pb2.Media.STICKER, data, mime_type, "", "", reply_to, ())


def location(latitude: float, longitude: float, *, name: str = "", address: str = "",
             reply_to: str = "") -> broker_pb2.Content:
    content = _content(reply_to, ())
    content.location.CopyFrom(broker_pb2.Location(latitude=latitude, longitude=longitude,
                                                  name=name, address=address))
    return content


def reaction(message_id: str, emoji: str, *, from_me: bool = False) -> broker_pb2.Content:
    """React to ``message_id`` with one emoji ("" removes the reaction)."""
    content = broker_pb2.Content()
    content.reaction.CopyFrom(broker_pb2.Reaction(message_id=message_id, emoji=emoji,
                                                  from_me=from_me))
    return content


def presence(value: str | int) -> broker_pb2.Presence.ValueType:
    """"available", "composing", "recording" or "paused" (or the enum's number)."""
    if isinstance(value, int):
        return broker_pb2.Presence.ValueType(value)
    try:
        return PRESENCES[value.lower()]
    except KeyError:
        raise ValueError(f"presence must be one of {sorted(PRESENCES)}, not {value!r}") from None
