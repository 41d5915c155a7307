"""Input rules shared by every entry point (gRPC, CLI), raising InvalidArgument."""

from __future__ import annotations

import math
import re

from broker.content import Content, Location, Media, Reaction, Text
from broker.errors import InvalidArgument

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
MAX_RECIPIENT = 256
MAX_KEY = 128
MAX_MESSAGE_ID = 256
"""A message id a caller names (GetMessage, DownloadMedia): at most this many characters."""
DEFAULT_TENANT = "default"


def session_id(value: str, field: str = "session_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if not _ID.fullmatch(value):  # match() would let "id\n" through ($ matches before \n)
        raise InvalidArgument(
            field, "must be 1-128 characters of A-Z a-z 0-9 . _ : - starting alphanumeric"
        )
    return value


def tenant(value: str, field: str = "tenant") -> str:
    return session_id(value, field) if value else DEFAULT_TENANT


def optional_tenant(value: str) -> str | None:
    return session_id(value, "tenant") if value else None


def recipient(value: str, field: str = "to") -> str:
    if not value or not value.strip():
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_RECIPIENT:
        raise InvalidArgument(field, f"must be at most {MAX_RECIPIENT} characters")
    return value


def body(value: str, max_bytes: int) -> str:
    if not value:
        raise InvalidArgument("body", "must not be empty")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument("body", f"is {size} bytes; the limit is {max_bytes}")
    return value


def idempotency_key(value: str) -> str:
    if len(value) > MAX_KEY or not value.isprintable():
        raise InvalidArgument(
            "idempotency_key", f"must be at most {MAX_KEY} printable characters"
        )
    return value


def phone_number(value: str, field: str = "phone_number") -> str:
    """E.164: '+', then 8-15 digits, the first not 0 (spaces and dashes are dropped)."""
    if not value:
        raise InvalidArgument(field, "is required")
    compact = re.sub(r"[ \-()]", "", value)
    if not _E164.fullmatch(compact):
        raise InvalidArgument(
            field, "must be an E.164 number: '+', the country code and the number, 8-15 "
                   "digits, e.g. +4915123456789"
        )
    return compact


MAX_MENTIONS = 256
MAX_FILE_NAME = 255
MAX_PLACE_TEXT = 1024
MAX_EMOJI_BYTES = 64
_MIME = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(?:\s*;\s*[A-Za-z0-9!#$&^_.+-]+=[^;\x00-\x1f\x7f]{1,128}){0,4}$")
_MESSAGE_REF = re.compile(r"^[\x21-\x7e]{1,256}$")


def _message_ref(value: str, field: str) -> str:
    if not _MESSAGE_REF.fullmatch(value):
        raise InvalidArgument(field, "must be a message id: 1-256 printable ASCII characters")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Control characters and line breaks: never in a name, an address or an emoji (the
invisible joiners of emoji sequences and of scripts are fine)."""


def _short_text(value: str, field: str, limit: int) -> str:
    if len(value) > limit or _CONTROL.search(value):
        raise InvalidArgument(field, f"must be at most {limit} characters, without control "
                                     "characters or line breaks")
    return value


def content(
    body_text: str, value: Content | None, *, max_body_bytes: int, max_media_bytes: int
) -> None:
    """A Send's body and content together (see SendRequest.content in the proto): a
    content kind excludes a body; without one the body is the (required) text."""
    if value is None or value.kind is None:
        body(body_text, max_body_bytes)
    elif body_text:
        raise InvalidArgument("body", "must be empty when content sets a kind (text, media, "
                                      "location or reaction)")
    if value is None:
        return
    if value.reply_to:
        _message_ref(value.reply_to, "content.reply_to")
    if len(value.mentions) > MAX_MENTIONS:
        raise InvalidArgument("content.mentions", f"must name at most {MAX_MENTIONS} addresses")
    for mention in value.mentions:
        recipient(mention, "content.mentions")
    match value.kind:
        case Text(text=text):
            if not text:
                raise InvalidArgument("content.text", "must not be empty")
            size = len(text.encode("utf-8"))
            if size > max_body_bytes:
                raise InvalidArgument("content.text",
                                      f"is {size} bytes; the limit is {max_body_bytes}")
        case Media() as m:
            media(m, max_body_bytes=max_body_bytes, max_media_bytes=max_media_bytes)
        case Location() as loc:
            if not (math.isfinite(loc.latitude) and -90 <= loc.latitude <= 90):
                raise InvalidArgument("content.location.latitude", "must be -90 to 90 degrees")
            if not (math.isfinite(loc.longitude) and -180 <= loc.longitude <= 180):
                raise InvalidArgument("content.location.longitude",
                                      "must be -180 to 180 degrees")
            _short_text(loc.name, "content.location.name", MAX_PLACE_TEXT)
            _short_text(loc.address, "content.location.address", MAX_PLACE_TEXT)
        case Reaction() as r:
            if not r.message_id:
                raise InvalidArgument("content.reaction.message_id", "is required")
            _message_ref(r.message_id, "content.reaction.message_id")
            if len(r.emoji.encode("utf-8")) > MAX_EMOJI_BYTES or _CONTROL.search(r.emoji):
                raise InvalidArgument("content.reaction.emoji",
                                      f"must be one emoji (at most {MAX_EMOJI_BYTES} bytes)")


def media(value: Media, *, max_body_bytes: int, max_media_bytes: int) -> None:
    if value.kind is None:
        raise InvalidArgument("content.media.kind", "must be image, video, audio, voice note, "
                                                    "document or sticker")
    if not value.data:
        raise InvalidArgument("content.media.data", "must not be empty")
    if len(value.data) > max_media_bytes:
        raise InvalidArgument("content.media.data", f"is {len(value.data)} bytes; the limit "
                              f"is {max_media_bytes} (--max-media-bytes)")
    if not _MIME.fullmatch(value.mime_type):
        raise InvalidArgument("content.media.mime_type",
                              "must be a MIME type, type/subtype (e.g. image/jpeg)")
    size = len(value.caption.encode("utf-8"))
    if size > max_body_bytes:
        raise InvalidArgument("content.media.caption",
                              f"is {size} bytes; the limit is {max_body_bytes}")
    _short_text(value.file_name, "content.media.file_name", MAX_FILE_NAME)
