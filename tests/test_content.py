"""broker.content, the pure parts: folding text into the body, the stored form and
the wire form round trips, a payload that is not one."""

from __future__ import annotations

import pytest

from broker import content as contents
from broker.content import Content, Location, Media, MediaKind, Reaction, Text, split_text

EVERY = [
    Content(Media(MediaKind.DOCUMENT, b"\x00\xffpdf", "application/pdf", "c", "a.pdf"),
            reply_to="m-1", mentions=("+1", "2@s.whatsapp.net")),
    Content(Media(MediaKind.VOICE_NOTE, b"ogg", "audio/ogg; codecs=opus")),
    Content(Location(-33.9, 18.4, "Cape Town", "")),
    Content(Reaction("ABC", "", from_me=True)),
    Content(reply_to="Q"),
]


def test_text_goes_to_the_body_and_empty_content_goes_away() -> None:
    assert split_text("hi", None) == ("hi", None)
    assert split_text("", Content(Text("hello"))) == ("hello", None)
    assert split_text("", Content(Text("hello"), reply_to="Q")) == \
        ("hello", Content(None, "Q", ()))
    assert split_text("body", Content()) == ("body", None)
    image = Content(Media(MediaKind.IMAGE, b"x", "image/png"))
    assert split_text("", image) == ("", image)


@pytest.mark.parametrize("value", EVERY)
def test_the_stored_and_wire_forms_round_trip(value: Content) -> None:
    assert contents.decode(contents.encode(value)) == value
    assert contents.from_wire(contents.to_wire(value), 1024) == value


def test_a_payload_that_is_not_one_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a stored content payload"):
        contents.decode(b"\xff\xff\xff")


def test_a_medium_never_shows_its_bytes() -> None:
    medium = Media(MediaKind.IMAGE, b"secret-bytes" * 10, "image/png")
    assert "secret" not in repr(medium) and "120 bytes" in repr(medium)
