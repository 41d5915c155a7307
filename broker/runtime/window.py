"""A session's delivery window: which outbox messages go to the upstream, when.

Sans-I/O like `broker.lifecycle.machine`: no asyncio, no clock reads (the
caller passes `now`, seconds on the clock of its timers), no store. The actor
feeds it what happened (the link opened or closed, messages were read or
claimed from the store, the store recorded acks, more may wait in the store,
the resend deadline passed) and asks it what to do (`read_limit`: read the
store, how much; `due`: send these; `resend_in`: wake up then; `idle`: stop).

Rules it owns:

- At most `limit` messages are in flight (sent, not acked) at a time.
- First sends go in sequence order: per-session FIFO. A message unacked
  `ack_timeout_s` after it was last sent is sent again (the upstream
  de-duplicates by message id), before any first send of that round.
- Every connection starts again from the oldest unacked message: `open`
  forgets everything, so the store's answer decides. A resend is harmless,
  a skipped message would be lost.
- Within a connection the store is read only for messages after the newest
  one read, and only when some may be waiting (`backlog`).
- Messages an enqueue claimed in its own write are taken as if read, unless
  a read is in flight (its answer may hold older ones): then the store is read
  again instead, so nothing older is skipped.
- `pipelined`: several messages await acks, so an outbox write may linger.
"""

from __future__ import annotations

from collections import deque

from broker.store.base import OutboxMessage

#: Messages awaiting acks from which the session's writes linger (`pipelined`),
#: and for how long after that they still do while any message awaits its ack.
PIPELINED = 4
PIPELINED_HOLD_S = 0.1

_NOTHING_IN_FLIGHT: dict[str, tuple[OutboxMessage, float]] = {}
_NOTHING_READY: deque[OutboxMessage] = deque()
"""Shared by closed windows (never written to: only an open window takes
messages); `open` gives each its own, so an idle session carries none."""
_NEVER = float("inf")


class DeliveryWindow:
    """The delivery state of one session's current connection; one actor owns it."""

    __slots__ = (
        "_backlog",
        "_epoch",
        "_in_flight",
        "_newest",
        "_open",
        "_pipelined_until",
        "_read_room",
        "_reading",
        "_ready",
        "_resend_at",
        "_stale_read",
        "ack_timeout_s",
        "limit",
    )

    def __init__(self, limit: int, ack_timeout_s: float) -> None:
        if limit < 1:
            raise ValueError("the send window must hold at least one message")
        self.limit = limit
        self.ack_timeout_s = ack_timeout_s
        self._epoch = 0
        self._open = False
        #: sent and not acked yet, by message id: (message, when last sent)
        self._in_flight = _NOTHING_IN_FLIGHT
        #: read (or claimed), not sent yet: the window was full; in order
        self._ready = _NOTHING_READY
        #: the highest sequence read; everything up to it is in flight, ready or acked
        self._newest = 0
        #: whether the store may hold messages not read yet
        self._backlog = True
        self._reading = False
        #: room in the window when the read in flight was asked for
        self._read_room = 0
        #: more may have come since the read in flight was asked for
        self._stale_read = False
        #: no message is due for a resend before this (a lower bound)
        self._resend_at = _NEVER
        self._pipelined_until = 0.0

    # -- read-only view -------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def epoch(self) -> int:
        """Which connection this is (grows on every `open`)."""
        return self._epoch

    @property
    def newest(self) -> int:
        """The highest sequence read: the store is asked only for messages after it."""
        return self._newest

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def backlog(self) -> bool:
        return self._backlog

    @property
    def reading(self) -> bool:
        return self._reading

    def idle(self) -> bool:
        """Nothing in flight, nothing to send, nothing known to wait in the store."""
        return not self._in_flight and not self._ready and not self._backlog

    # -- the link -------------------------------------------------------------

    def open(self) -> int:
        """A connection opened: start again from the oldest unacked message (read
        from the store). Returns the connection's epoch, for `close`/`claimed`."""
        self._epoch += 1
        self._open = True
        self._in_flight = {}
        self._ready = deque()
        self._newest = 0
        self._backlog = True
        self._reading = False
        self._stale_read = False
        self._resend_at = _NEVER
        return self._epoch

    def close(self, epoch: int | None = None) -> None:
        """The connection (of `epoch`, if given) is over: forget its delivery state,
        so an idle session keeps none. A close for an older connection is ignored."""
        if epoch is not None and epoch != self._epoch:
            return
        self._open = False
        self._in_flight = _NOTHING_IN_FLIGHT
        self._ready = _NOTHING_READY
        self._reading = False
        self._resend_at = _NEVER

    # -- the store ------------------------------------------------------------

    def maybe_more(self) -> None:
        """Messages may have been queued that this window has not read (a kick)."""
        self._backlog = True
        if self._reading:
            self._stale_read = True

    def read_limit(self) -> int:
        """How many messages to ask the store for (after `newest`), or 0: no read.

        A positive answer means a read is now in flight: report its answer with
        `read_done`, or `read_failed`."""
        if not self._open or self._reading or not self._backlog:
            return 0
        room = self.limit - len(self._in_flight) - len(self._ready)
        if room <= 0:
            return 0
        self._reading = True
        self._read_room = room
        self._stale_read = False
        return self.limit

    def read_done(self, messages: list[OutboxMessage]) -> None:
        """The store's answer to `read_limit`: unacked messages after `newest`, in order."""
        if not self._reading:
            return  # the connection it was for closed meanwhile
        self._reading = False
        self._take(messages)
        # Fewer than asked: the store had no more, unless some came since.
        self._backlog = self._stale_read or len(messages) >= self._read_room
        self._stale_read = False

    def read_failed(self) -> None:
        """The read in flight failed; the store is asked again next time."""
        self._reading = False
        self._stale_read = False
        self._backlog = True

    def may_claim(self) -> bool:
        """Whether an enqueue may claim its messages for this window in its write:
        only when nothing older can be unread, so claiming keeps the order."""
        return self._open and not self._backlog and not self._reading

    def claimed(self, epoch: int, messages: list[OutboxMessage], unread: bool) -> bool:
        """Messages an enqueue claimed (with `may_claim`) for connection `epoch`;
        `unread`: the store holds more not read yet.

        False: not taken (the connection is gone, or a read started since, whose
        answer may hold older messages); the store is to be read instead (call
        `maybe_more`, done here for this connection)."""
        if epoch != self._epoch or not self._open:
            return False
        if self._reading:
            self.maybe_more()
            return False
        self._take(messages)
        if unread:
            self._backlog = True
        return True

    def _take(self, messages: list[OutboxMessage]) -> None:
        newest = self._newest
        ready = self._ready
        for message in messages:
            if message.sequence > newest:
                ready.append(message)
                newest = message.sequence
        self._newest = newest

    # -- the upstream ---------------------------------------------------------

    def acked(self, message_id: str) -> bool:
        """The store recorded the upstream's ack; False: not in flight here (a
        duplicate ack, an ack of an earlier connection, an unknown id)."""
        return self._in_flight.pop(message_id, None) is not None

    def due(self, now: float) -> list[OutboxMessage]:
        """What to send at `now`, in order: resends of messages unacked for the ack
        timeout, then first sends while the window has room. All count as sent."""
        if not self._open:
            return []
        in_flight = self._in_flight
        out: list[OutboxMessage] = []
        if now >= self._resend_at:
            timeout = self.ack_timeout_s
            resend_at = _NEVER
            for message_id, (message, sent) in in_flight.items():
                if sent + timeout <= now:  # the same sum as the bound: no busy loop
                    in_flight[message_id] = (message, now)  # same key: no resize
                    out.append(message)
                    sent = now
                resend_at = min(resend_at, sent + timeout)
            self._resend_at = resend_at
        ready = self._ready
        if ready and len(in_flight) < self.limit:
            while ready and len(in_flight) < self.limit:
                message = ready.popleft()
                in_flight[message.message_id] = (message, now)
                out.append(message)
            self._resend_at = min(self._resend_at, now + self.ack_timeout_s)
        return out

    def resend_in(self, now: float) -> float | None:
        """Seconds until a resend may be due (0: now), None: nothing in flight."""
        if not self._in_flight:
            return None
        return max(0.0, self._resend_at - now)

    def pipelined(self, now: float) -> bool:
        """Several messages await their acks: those acks, and the Sends they free,
        arrive within a round trip, so a write may linger to take them along.

        With a store that writes at once (memory) this is the only sign of load,
        and taking acks and Sends in bursts is what lets one session near the
        relay floor at 64 Sends in flight (docs/benchmarks.md). A lone Send, or
        a few, never waits. Once pipelined, a session stays so for a moment while
        anything is in flight: right after a batch of acks few messages are out,
        and dropping back to one write per message there tends to stick, since
        one write per message never has enough in flight to linger again.
        """
        in_flight = len(self._in_flight)
        if in_flight >= PIPELINED:
            self._pipelined_until = now + PIPELINED_HOLD_S
            return True
        return in_flight > 0 and now < self._pipelined_until
