"""A message's content beyond plain text: media, a location, a reaction, a quote and
mentions (issue 15).

One domain value (`Content`) with three faces, all pure:
- the stored form (`encode` / `decode`): the serialized proto `Content`, an opaque
  payload the stores keep next to the message, so they need one optional field;
- the wire form of docs/protocol.md (`to_wire` / `from_wire`): JSON, media as base64;
- the API's `pb.Content` (`from_proto`, used by `encode` too).

Plain text stays in the message's `body`: a `Content` whose `kind` is None carries
only a quote or mentions for that body, and a text kind is folded into the body
(`split_text`), so text messages keep the path (and the stores' columns) they had.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from google.protobuf.message import DecodeError

from broker_client.v1 import broker_pb2 as pb


class MediaKind(StrEnum):
    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"
    VOICE_NOTE = "voice_note"
    DOCUMENT = "document"
    STICKER = "sticker"


class Presence(StrEnum):
    """What a session is doing in a chat (SendPresence); the values are the wire's
    and Baileys' `sendPresenceUpdate` types."""

    AVAILABLE = "available"
    COMPOSING = "composing"
    RECORDING = "recording"
    PAUSED = "paused"


PRESENCE_FROM_PB = {
    pb.AVAILABLE: Presence.AVAILABLE, pb.COMPOSING: Presence.COMPOSING,
    pb.RECORDING: Presence.RECORDING, pb.PAUSED: Presence.PAUSED,
}

_KIND_FROM_PB = {
    pb.Media.IMAGE: MediaKind.IMAGE, pb.Media.VIDEO: MediaKind.VIDEO,
    pb.Media.AUDIO: MediaKind.AUDIO, pb.Media.VOICE_NOTE: MediaKind.VOICE_NOTE,
    pb.Media.DOCUMENT: MediaKind.DOCUMENT, pb.Media.STICKER: MediaKind.STICKER,
}
_KIND_TO_PB = {kind: value for value, kind in _KIND_FROM_PB.items()}


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Media:
    kind: MediaKind | None
    """None: the request named no kind (refused by validation)."""
    data: bytes
    mime_type: str
    caption: str = ""
    file_name: str = ""
    size: int = 0
    """Inbound, as kept: the medium's size (its bytes are kept apart, `data` is empty)."""
    download_error: str = ""
    """Inbound: why the bytes could not be kept ("" when they are)."""

    def __repr__(self) -> str:  # never a medium's bytes in a log line
        return (f"Media(kind={self.kind}, {len(self.data) or self.size} bytes, "
                f"mime_type={self.mime_type!r}, caption={len(self.caption)} chars, "
                f"file_name={self.file_name!r}, download_error={self.download_error!r})")


@dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    name: str = ""
    address: str = ""


@dataclass(frozen=True)
class Reaction:
    message_id: str
    emoji: str = ""
    """Empty: remove the earlier reaction."""
    from_me: bool = False


Kind = Text | Media | Location | Reaction


@dataclass(frozen=True)
class Content:
    kind: Kind | None = None
    """None: the message's `body` is its text."""
    reply_to: str = ""
    mentions: tuple[str, ...] = ()

    @property
    def media(self) -> Media | None:
        return self.kind if isinstance(self.kind, Media) else None


def split_text(body: str, content: Content | None) -> tuple[str, Content | None]:
    """(body, content) with a text kind moved into the body; content that then says
    nothing beyond the body becomes None, so it is stored and sent as before."""
    if content is None:
        return body, None
    if isinstance(content.kind, Text):
        body, content = content.kind.text, Content(None, content.reply_to, content.mentions)
    if content.kind is None and not content.reply_to and not content.mentions:
        return body, None
    return body, content


# -- the API's message, and the stored form ----------------------------------------

def from_proto(message: pb.Content) -> Content:
    kind: Kind | None = None
    match message.WhichOneof("kind"):
        case "text":
            kind = Text(message.text)
        case "media":
            m = message.media
            kind = Media(_KIND_FROM_PB.get(m.kind), m.data, m.mime_type, m.caption, m.file_name,
                         m.size, m.download_error)
        case "location":
            loc = message.location
            kind = Location(loc.latitude, loc.longitude, loc.name, loc.address)
        case "reaction":
            r = message.reaction
            kind = Reaction(r.message_id, r.emoji, r.from_me)
    return Content(kind, message.reply_to, tuple(message.mentions))


def to_proto(content: Content) -> pb.Content:
    message = pb.Content(reply_to=content.reply_to, mentions=list(content.mentions))
    match content.kind:
        case Text(text=text):
            message.text = text
        case Media() as m:
            message.media.CopyFrom(pb.Media(
                kind=_KIND_TO_PB[m.kind] if m.kind else pb.Media.KIND_UNSPECIFIED,
                data=m.data, mime_type=m.mime_type, caption=m.caption, file_name=m.file_name,
                size=m.size, download_error=m.download_error))
        case Location() as loc:
            message.location.CopyFrom(pb.Location(latitude=loc.latitude, longitude=loc.longitude,
                                                  name=loc.name, address=loc.address))
        case Reaction() as r:
            message.reaction.CopyFrom(pb.Reaction(message_id=r.message_id, emoji=r.emoji,
                                                  from_me=r.from_me))
    return message


def keep_inbound(content: Content | None, max_media_bytes: int) -> tuple[bytes | None,
                                                                         bytes | None]:
    """An inbound message's content as the store keeps it: (the payload, with a
    medium's bytes taken out and its size set; the medium's bytes, or None). A medium
    over `max_media_bytes` keeps only its metadata and says why, so the message itself
    is never lost to its attachment."""
    if content is None:
        return None, None
    media = content.media
    if media is None:
        return encode(content), None
    size = len(media.data) or media.size
    data: bytes | None = media.data or None
    error = media.download_error
    if data is not None and len(data) > max_media_bytes:
        data, error = None, (f"the medium is {len(media.data)} bytes, over the broker's "
                             f"--max-media-bytes ({max_media_bytes})")
    elif data is None and not error:
        error = "the upstream gave no bytes for the medium"
    kept = replace(media, data=b"", size=size, download_error=error)
    return encode(replace(content, kind=kept)), data


def encode(content: Content) -> bytes:
    """The stored payload: the serialized proto (compact, bytes as they are, versioned
    by the contract's own compatibility rules)."""
    return to_proto(content).SerializeToString()


def decode(payload: bytes) -> Content:
    """The stored payload back; ValueError when it is not one."""
    message = pb.Content()
    try:
        message.ParseFromString(payload)
    except DecodeError as exc:
        raise ValueError(f"not a stored content payload: {exc}") from None
    return from_proto(message)


# -- the wire form of docs/protocol.md -----------------------------------------------

def to_wire(content: Content) -> dict[str, Any]:
    out: dict[str, Any] = {}
    match content.kind:
        case Media() as m:
            out["media"] = {"kind": str(m.kind), "data": base64.b64encode(m.data).decode(),
                            "mime_type": m.mime_type, "caption": m.caption,
                            "file_name": m.file_name}
            if m.size:
                out["media"]["size"] = m.size
            if m.download_error:
                out["media"]["error"] = m.download_error
        case Location() as loc:
            out["location"] = {"latitude": loc.latitude, "longitude": loc.longitude,
                               "name": loc.name, "address": loc.address}
        case Reaction() as r:
            out["reaction"] = {"message_id": r.message_id, "emoji": r.emoji,
                               "from_me": r.from_me}
        case Text(text=text):
            out["text"] = text
    if content.reply_to:
        out["reply_to"] = content.reply_to
    if content.mentions:
        out["mentions"] = list(content.mentions)
    return out


MAX_WIRE_MENTIONS = 256
MAX_WIRE_TEXT = 1 << 20


def _text(obj: dict[str, Any], key: str, max_len: int = MAX_WIRE_TEXT) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"content field {key!r} must be a string of at most {max_len} "
                         "characters")
    return value


def _number(obj: dict[str, Any], key: str, bound: float) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or \
            not math.isfinite(value) or not -bound <= value <= bound:
        raise ValueError(f"content field {key!r} must be a number in [-{bound}, {bound}]")
    return float(value)


def _object(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj[key]
    if not isinstance(value, dict):
        raise ValueError(f"content field {key!r} must be an object")
    return value


def from_wire(obj: Any, max_media_bytes: int, *, inbound: bool = False) -> Content:
    """A send frame's `content`, strictly; ValueError on anything off-spec (the
    simulator closes the connection as a bad frame). `inbound`: a message frame's
    (docs/protocol.md "Content", inbound): a medium may come without bytes, with its
    `size` and the `error` that kept them away, and its bytes are not capped here
    (the frame's size bounds them; `keep_inbound` applies the broker's limit)."""
    if not isinstance(obj, dict):
        raise ValueError("field 'content' must be an object")
    kinds = [k for k in ("text", "media", "location", "reaction") if k in obj]
    if len(kinds) > 1:
        raise ValueError(f"content has more than one kind: {kinds}")
    kind: Kind | None = None
    if kinds == ["text"]:
        kind = Text(_text(obj, "text"))
    elif kinds == ["media"]:
        m = _object(obj, "media")
        try:
            media_kind = MediaKind(_text(m, "kind", 32))
        except ValueError:
            raise ValueError("content media 'kind' is not a known kind") from None
        raw = _text(m, "data", max_len=4 * (max_media_bytes // 3 + 1))
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("content media 'data' is not base64") from None
        size, error = 0, ""
        if inbound:
            error = _text(m, "error", 1024)
            size = int(_number(m, "size", float(1 << 40))) if "size" in m else len(data)
            if size < 0:
                raise ValueError("content media 'size' must not be negative")
            if not data and not error:
                raise ValueError("content media has neither 'data' nor an 'error'")
        elif not data or len(data) > max_media_bytes:
            raise ValueError(f"content media is {len(data)} bytes; 1 to {max_media_bytes} allowed")
        kind = Media(media_kind, data, _text(m, "mime_type", 255), _text(m, "caption"),
                     _text(m, "file_name", 255), size, error)
    elif kinds == ["location"]:
        loc = _object(obj, "location")
        kind = Location(_number(loc, "latitude", 90), _number(loc, "longitude", 180),
                        _text(loc, "name", 1024), _text(loc, "address", 1024))
    elif kinds == ["reaction"]:
        r = _object(obj, "reaction")
        from_me = r.get("from_me", False)
        if not isinstance(from_me, bool):
            raise ValueError("content reaction 'from_me' must be a boolean")
        message_id = _text(r, "message_id", 256)
        if not message_id:
            raise ValueError("content reaction needs a 'message_id'")
        kind = Reaction(message_id, _text(r, "emoji", 64), from_me)
    mentions = obj.get("mentions", [])
    if not isinstance(mentions, list) or len(mentions) > MAX_WIRE_MENTIONS or \
            not all(isinstance(x, str) and 0 < len(x) <= 256 for x in mentions):
        raise ValueError(f"content 'mentions' must be at most {MAX_WIRE_MENTIONS} addresses")
    return Content(kind, _text(obj, "reply_to", 256), tuple(mentions))
