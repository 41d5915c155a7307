"""Session states, the groupings of them other modules act on, and the few
reason phrases other modules match on.

The values equal the names so a state survives a round trip through JSON, the
store and the proto enum (`SessionState`) without a lookup table. A grouping
lives here, next to the states, so adding a state means reading every rule
that must place it.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    STOPPED = "STOPPED"
    CONNECTING = "CONNECTING"
    PAIRING = "PAIRING"
    OPEN = "OPEN"
    RECONNECTING = "RECONNECTING"
    LOGGED_OUT = "LOGGED_OUT"
    CONFLICT = "CONFLICT"
    FAILED = "FAILED"


#: States in which an upstream connection exists (or is being opened), so
#: leaving them means closing it.
CONNECTED_STATES: frozenset[State] = frozenset({State.CONNECTING, State.PAIRING, State.OPEN})

#: States `Start` (re)starts from; from the others a connection is already on its way.
STARTABLE_STATES: frozenset[State] = frozenset(
    {State.STOPPED, State.FAILED, State.CONFLICT, State.LOGGED_OUT, State.RECONNECTING}
)

#: States in which a waiting Send cannot succeed until a person acts: its
#: waiter is released at once instead of running out its deadline.
NEEDS_A_PERSON: frozenset[State] = frozenset(
    {State.STOPPED, State.PAIRING, State.LOGGED_OUT, State.CONFLICT, State.FAILED}
)

#: Entering these ends any reconnect in progress: coming back from them is a
#: fresh start by a person, not a reconnect time worth averaging (health).
ENDS_ANY_RECONNECT: frozenset[State] = frozenset({State.STOPPED, State.LOGGED_OUT, State.FAILED})

#: Reason of FAILED when the QR limit ran out (health matches on it).
PAIRING_TIMED_OUT = "pairing timed out: nobody scanned the QR"
#: Close reason when the HANDSHAKE timer ran out.
HANDSHAKE_TIMED_OUT = "handshake timed out"
#: Reason of the 408 after it while CONNECTING (while PAIRING the 408 starts
#: the next pairing round, which has its own reason).
HANDSHAKE_UNANSWERED = "upstream did not answer the handshake"
#: Reason of STOPPED after the lease went to another process.
LEASE_LOST = "lease lost"
#: Appended to a reason when the attempt budget spaced the next attempt out.
SPACED_OUT = "reconnects spaced out: the connection keeps dropping"
#: Prefix of the reason of FAILED after too many failed attempts.
GAVE_UP_PREFIX = "gave up after "


#: Prefix of the reason of FAILED when the stored credentials do not decrypt.
CREDENTIALS_UNREADABLE_PREFIX = "credentials do not decrypt"


def credentials_unreadable_reason(key_id: str) -> str:
    """The FAILED reason when the credentials are sealed with a key not configured."""
    named = f"key id {key_id!r}" if key_id else "no known key id"
    return f"{CREDENTIALS_UNREADABLE_PREFIX} ({named}): configure that key, then restart"


def gave_up_reason(attempts: int) -> str:
    """The FAILED reason after `attempts` consecutive failed attempts."""
    return f"{GAVE_UP_PREFIX}{attempts} attempts"
