"""DownloadMedia: the kept bytes of an inbound message's medium.

An engine hands a medium's bytes over with the message (the simulator inline, the
Baileys bridge after Baileys' own download as the message arrives), and the actor
stores them with the entry (`broker.content.keep_inbound`). So any instance answers,
without the session being open and after the upstream's link to the file expired;
this module only finds them and says, typed, why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker import content as contents
from broker import validation
from broker.content import Media
from broker.errors import InvalidArgument, MediaNotFound, MediaUnavailable, SessionNotFound
from broker.store.base import Store

CHUNK_BYTES = 1 << 20
"""DownloadMedia's chunk size: well under every gRPC message limit."""


@dataclass(frozen=True)
class KeptMedia:
    media: Media
    """The medium's metadata (kind, MIME type, caption, file name, size)."""
    data: bytes


class MediaService:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def download(self, session_id: str, message_id: str) -> KeptMedia:
        """The medium of the inbound message with upstream id `message_id`."""
        validation.session_id(session_id)
        limit = validation.MAX_MESSAGE_ID
        if not message_id or len(message_id) > limit or not message_id.isprintable():
            raise InvalidArgument("message_id", f"must be 1-{limit} printable "
                                  "characters: an InboundMessage's upstream_id")
        record = (await self.store.find_inbound(session_id, [message_id])).get(message_id)
        if record is None:
            if await self.store.get_session(session_id) is None:
                raise SessionNotFound(session_id)
            raise self._not_found(session_id, message_id, "keeps no inbound message with "
                                  "that upstream id (never received, or past the inbound "
                                  "retention)")
        media = contents.decode(record.content).media if record.content else None
        if media is None:
            raise self._not_found(session_id, message_id, "has no medium in that message")
        if media.download_error:
            raise MediaUnavailable(
                f"session {session_id!r} could not keep the medium of message "
                f"{message_id[:80]!r}: {media.download_error}", session_id=session_id,
                message_id=message_id[:80], why=media.download_error[:200])
        data = await self.store.inbound_media(session_id, message_id)
        if data is None:  # trimmed between the two reads
            raise self._not_found(session_id, message_id, "no longer keeps that medium")
        return KeptMedia(media, data)

    @staticmethod
    def _not_found(session_id: str, message_id: str, what: str) -> MediaNotFound:
        return MediaNotFound(f"session {session_id!r} {what}: {message_id[:80]!r}",
                             session_id=session_id, message_id=message_id[:80])
