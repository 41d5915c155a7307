"""Session states, and the few reason phrases other modules match on.

The values equal the names so a state survives a round trip through JSON, the
store and the proto enum (`SessionState`) without a lookup table.
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

#: Reason of FAILED when the QR limit ran out (health matches on it).
PAIRING_TIMED_OUT = "pairing timed out: nobody scanned the QR"
#: Reason of STOPPED after the lease went to another process.
LEASE_LOST = "lease lost"
#: Appended to a reason when the attempt budget spaced the next attempt out.
SPACED_OUT = "reconnects spaced out: the connection keeps dropping"
#: Prefix of the reason of FAILED after too many failed attempts.
GAVE_UP_PREFIX = "gave up after "


def gave_up_reason(attempts: int) -> str:
    """The FAILED reason after `attempts` consecutive failed attempts."""
    return f"{GAVE_UP_PREFIX}{attempts} attempts"
