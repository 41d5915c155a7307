"""Disconnect reason codes and what each one means for the session.

Codes follow the WhatsApp-web conventions that Baileys exposes (its
`DisconnectReason` and `lastDisconnect.error.output.statusCode`), so operators
who know those recognise them, and the Baileys engine reports them as they
are; the protocol-v1 wire carries them as websocket close codes 4000 + code.
What each code makes the session do is `broker.lifecycle.machine`'s table.
"""

from __future__ import annotations

from enum import IntEnum


class DisconnectCode(IntEnum):
    BAD_FRAME = 400
    LOGGED_OUT = 401
    FORBIDDEN = 403
    CLIENT_OUTDATED = 405
    TIMED_OUT = 408
    MULTIDEVICE_MISMATCH = 411
    CONNECTION_CLOSED = 428
    RATE_LIMITED = 429
    REPLACED = 440
    BAD_SESSION = 500
    UNAVAILABLE = 503
    RESTART_REQUIRED = 515

    @property
    def text(self) -> str:
        return _TEXT[self]


_TEXT: dict[DisconnectCode, str] = {
    DisconnectCode.BAD_FRAME: "bad frame",
    DisconnectCode.LOGGED_OUT: "logged out",
    DisconnectCode.FORBIDDEN: "forbidden",
    DisconnectCode.CLIENT_OUTDATED: "client outdated: WhatsApp rejected the web version",
    DisconnectCode.TIMED_OUT: "timed out",
    DisconnectCode.MULTIDEVICE_MISMATCH: "multi-device mismatch",
    DisconnectCode.CONNECTION_CLOSED: "connection closed",
    DisconnectCode.RATE_LIMITED: "rate limited",
    DisconnectCode.REPLACED: "replaced by another connection",
    DisconnectCode.BAD_SESSION: "bad session",
    DisconnectCode.UNAVAILABLE: "service unavailable",
    DisconnectCode.RESTART_REQUIRED: "restart required",
}


def parse_code(value: int) -> DisconnectCode:
    """Map any integer to a known code; unknown ones count as a lost connection."""
    try:
        return DisconnectCode(value)
    except ValueError:
        return DisconnectCode.CONNECTION_CLOSED
