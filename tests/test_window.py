"""The delivery window, fed event by event: no I/O, no event loop, time passed in."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker.runtime.window import DeliveryWindow
from broker.store.base import OutboxMessage

TIMEOUT = 5.0


def msg(n: int) -> OutboxMessage:
    return OutboxMessage(session_id="s-1", message_id=f"m-{n}", to="+1", body="hi",
                         idempotency_key=f"k-{n}", sequence=n, accepted_at=0.0)


def msgs(*ns: int) -> list[OutboxMessage]:
    return [msg(n) for n in ns]


def seqs(messages: list[OutboxMessage]) -> list[int]:
    return [m.sequence for m in messages]


def opened(limit: int = 3) -> DeliveryWindow:
    w = DeliveryWindow(limit, TIMEOUT)
    w.open()
    return w


def test_a_new_connection_reads_the_store_for_a_full_window() -> None:
    w = opened(3)
    assert w.read_limit() == 3 and w.reading
    assert w.read_limit() == 0  # one read at a time
    w.read_done(msgs(1, 2))
    assert not w.backlog  # fewer than there was room for: the store had no more
    assert seqs(w.due(0.0)) == [1, 2]


def test_never_more_than_the_window_in_flight() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done(msgs(1, 2, 3, 4, 5))
    assert seqs(w.due(0.0)) == [1, 2, 3]
    assert w.in_flight == 3 and w.ready == 2
    assert w.due(1.0) == []  # full
    assert w.read_limit() == 0  # and no room to read into
    assert w.acked("m-2")
    assert seqs(w.due(1.0)) == [4]
    assert w.in_flight == 3


def test_a_full_read_leaves_a_backlog_and_the_next_read_starts_after_the_newest() -> None:
    w = opened(2)
    w.read_limit()
    w.read_done(msgs(1, 2))
    assert w.backlog and w.newest == 2
    w.due(0.0)
    w.acked("m-1")
    w.acked("m-2")
    assert w.read_limit() == 2
    w.read_done(msgs(2, 3))  # an overlap with what is held is dropped
    assert seqs(w.due(0.0)) == [3]


def test_an_unacked_message_is_resent_after_the_ack_timeout_and_only_then() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done(msgs(1, 2))
    w.due(0.0)
    assert w.resend_in(1.0) == TIMEOUT - 1.0
    assert w.due(TIMEOUT - 0.5) == []
    w.acked("m-1")
    assert seqs(w.due(TIMEOUT)) == [2]
    assert w.resend_in(TIMEOUT) == TIMEOUT  # timed from the resend
    assert w.due(TIMEOUT + 1.0) == []
    assert seqs(w.due(2 * TIMEOUT)) == [2]


def test_resends_go_before_first_sends_and_nothing_in_flight_means_no_deadline() -> None:
    w = opened(2)
    w.read_limit()
    w.read_done(msgs(1, 2, 3))
    w.due(0.0)
    w.acked("m-2")
    assert seqs(w.due(TIMEOUT)) == [1, 3]
    w.acked("m-1")
    w.acked("m-3")
    assert w.resend_in(TIMEOUT) is None


def test_every_reconnect_starts_again_from_the_oldest_unacked_message() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done(msgs(1, 2, 3, 4))
    w.due(0.0)
    w.acked("m-1")
    epoch = w.epoch
    w.close(epoch)
    assert w.in_flight == w.ready == 0 and w.due(1.0) == []
    assert w.open() == epoch + 1
    assert w.newest == 0 and w.backlog
    assert w.read_limit() == 3
    w.read_done(msgs(2, 3, 4))  # the store's oldest unacked
    assert seqs(w.due(1.0)) == [2, 3, 4]
    # An ack from the first connection's write lands now: harmless either way.
    assert w.acked("m-2")


def test_a_late_close_of_an_earlier_connection_is_ignored() -> None:
    w = opened(3)
    first = w.epoch
    w.close(first)
    w.open()
    w.close(first)
    assert w.is_open


def test_duplicate_acks_and_acks_for_unknown_ids_change_nothing() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done(msgs(1, 2))
    w.due(0.0)
    assert w.acked("m-1")
    assert not w.acked("m-1")
    assert not w.acked("nobody")
    assert w.in_flight == 1
    closed = DeliveryWindow(3, TIMEOUT)
    assert not closed.acked("m-1")


def test_claimed_messages_are_sent_without_reading_the_store() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done([])
    assert w.may_claim()
    assert w.claimed(w.epoch, msgs(1, 2), unread=False)
    assert w.read_limit() == 0
    assert seqs(w.due(0.0)) == [1, 2]


def test_claimed_with_older_unread_messages_reads_the_store_next() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done([])
    assert w.claimed(w.epoch, msgs(5), unread=True)
    assert w.read_limit() == 3


def test_claiming_is_refused_while_the_store_may_hold_older_unread_messages() -> None:
    w = opened(3)
    assert not w.may_claim()  # a new connection has read nothing yet
    w.read_limit()
    assert not w.may_claim()  # reading
    w.read_done([])
    w.maybe_more()
    assert not w.may_claim()  # kicked: something may be unread
    assert not DeliveryWindow(3, TIMEOUT).may_claim()  # closed


def test_claimed_messages_handed_over_while_a_read_is_in_flight_are_read_again() -> None:
    """The race: an enqueue claimed 3 (so the store's read of 1..2 ran first), but
    its answer arrives before the read's. Taking 3 would make the read's 1..2
    look old and skip them; the window reads the store again instead."""
    w = opened(5)
    w.read_limit()
    w.read_done([])
    epoch = w.epoch
    assert w.may_claim()  # the enqueue's write starts with claim
    w.maybe_more()  # a kick from another instance: a read starts meanwhile
    assert w.read_limit() == 5
    assert not w.claimed(epoch, msgs(3), unread=False)
    w.read_done(msgs(1, 2))  # answered before the claim: 3 not in it
    assert w.backlog  # not believed: the store is read again
    assert seqs(w.due(0.0)) == [1, 2]
    assert w.read_limit() == 5
    w.read_done(msgs(3))
    assert seqs(w.due(0.0)) == [3]


def test_a_kick_during_a_read_is_not_lost_when_the_read_comes_back_short() -> None:
    w = opened(5)
    w.read_limit()
    w.maybe_more()  # a message queued after the read was asked for
    w.read_done(msgs(1))
    assert w.backlog and w.read_limit() == 5


def test_claims_for_an_earlier_connection_are_refused() -> None:
    w = opened(3)
    w.read_limit()
    w.read_done([])
    epoch = w.epoch
    w.close(epoch)
    w.open()
    assert not w.claimed(epoch, msgs(1), unread=False)
    assert w.ready == 0


def test_a_failed_read_is_asked_again() -> None:
    w = opened(3)
    w.read_limit()
    w.read_failed()
    assert not w.reading and w.read_limit() == 3


def test_a_read_answered_after_the_connection_closed_is_dropped() -> None:
    w = opened(3)
    w.read_limit()
    w.close()
    w.read_done(msgs(1))
    assert w.ready == 0 and w.due(0.0) == []


def test_idle_only_when_nothing_is_held_or_waiting() -> None:
    w = opened(3)
    assert not w.idle()  # the store has not been read
    w.read_limit()
    w.read_done(msgs(1))
    assert not w.idle()
    w.due(0.0)
    assert not w.idle()
    w.acked("m-1")
    assert w.idle()


def test_a_window_must_hold_a_message() -> None:
    with pytest.raises(ValueError):
        DeliveryWindow(0, TIMEOUT)


# -- a model of the store, driven in every order ---------------------------------


@dataclass
class _Read:
    after: int
    limit: int
    answer: list[OutboxMessage] | None = None


@dataclass
class _Write:
    """An enqueue's outbox write: decided (claim or not), run by the store, answered."""

    n: int
    claim: bool
    epoch: int
    ran: bool = False
    claimed: list[OutboxMessage] = field(default_factory=list)
    unread: bool = False


class WindowModel(RuleBasedStateMachine):
    """The window against an in-memory outbox that behaves like the stores
    (pending after a sequence; claims of the oldest unread), with reads and claim
    answers arriving in any order, acks, lost acks, timeouts and reconnects."""

    @initialize(limit=st.integers(1, 5))
    def setup(self, limit: int) -> None:
        self.w = DeliveryWindow(limit, TIMEOUT)
        self.unacked: dict[int, OutboxMessage] = {}
        self.read_upto = 0
        self.seq = 0
        self.now = 0.0
        self.read: _Read | None = None
        self.writes: list[_Write] = []
        self.first_sent: list[int] = []
        self.sent_ever: set[int] = set()
        self.w.open()

    # the store
    def _pending(self, limit: int, after: int) -> list[OutboxMessage]:
        oldest = sorted(self.unacked)[:limit]
        out = [self.unacked[s] for s in oldest if s > after]
        if out:
            self.read_upto = max(self.read_upto, out[-1].sequence)
        return out

    @rule(n=st.integers(1, 3))
    def enqueue(self, n: int) -> None:
        self.writes.append(_Write(n, self.w.may_claim(), self.w.epoch))

    @precondition(lambda self: any(not w.ran for w in self.writes))
    @rule()
    def store_runs_write(self) -> None:
        write = next(w for w in self.writes if not w.ran)  # one write at a time, in order
        write.ran = True
        for _ in range(write.n):
            self.seq += 1
            self.unacked[self.seq] = msg(self.seq)
        if write.claim:
            unsent = [m for s, m in sorted(self.unacked.items()) if s > self.read_upto]
            write.claimed = unsent[: write.n]
            if write.claimed:
                self.read_upto = write.claimed[-1].sequence
            write.unread = self.seq > self.read_upto

    @precondition(lambda self: self.writes and self.writes[0].ran)
    @rule()
    def write_answered(self) -> None:
        self._answer(self.writes.pop(0))

    def _answer(self, write: _Write) -> None:
        if not write.claim or not self.w.claimed(write.epoch, write.claimed, write.unread):
            self.w.maybe_more()  # the actor's kick

    @rule()
    def kick(self) -> None:
        self.w.maybe_more()

    @precondition(lambda self: self.read is None)
    @rule()
    def ask_read(self) -> None:
        limit = self.w.read_limit()
        if limit:
            self.read = _Read(self.w.newest, limit)

    @precondition(lambda self: self.read is not None and self.read.answer is None)
    @rule()
    def store_runs_read(self) -> None:
        assert self.read is not None
        self.read.answer = self._pending(self.read.limit, self.read.after)

    @precondition(lambda self: self.read is not None and self.read.answer is not None)
    @rule(fail=st.booleans())
    def read_answered(self, fail: bool) -> None:
        assert self.read is not None and self.read.answer is not None
        if fail:
            self.w.read_failed()
        else:
            self.w.read_done(self.read.answer)
        self.read = None

    # the upstream
    @rule(dt=st.sampled_from([0.0, 1.0, TIMEOUT]))
    def send_due(self, dt: float) -> None:
        self.now += dt
        for m in self.w.due(self.now):
            if m.sequence not in self.sent_ever:
                self.sent_ever.add(m.sequence)
                self.first_sent.append(m.sequence)

    @rule(i=st.integers(0, 10), lost=st.booleans())
    def ack_one(self, i: int, lost: bool) -> None:
        in_flight = sorted(s for s in self.sent_ever if s in self.unacked)
        if not in_flight:
            return
        s = in_flight[i % len(in_flight)]
        if lost:
            return
        del self.unacked[s]
        self.w.acked(f"m-{s}")

    @rule()
    def duplicate_ack(self) -> None:
        for s in self.sent_ever - set(self.unacked):
            assert not self.w.acked(f"m-{s}")
            break

    @rule()
    def reconnect(self) -> None:
        self.w.close(self.w.epoch)
        self.w.open()
        self.read = None  # the old connection's read is abandoned with it
        # Every reader starts over: what a former connection read is taken over.
        self.read_upto = 0

    # rules that always hold
    @invariant()
    def never_more_than_the_window_in_flight(self) -> None:
        assert self.w.in_flight <= self.w.limit

    @invariant()
    def first_sends_keep_the_session_fifo(self) -> None:
        assert self.first_sent == sorted(self.first_sent)

    def teardown(self) -> None:
        """Once the dust settles (answers in, acks flowing), everything is delivered
        without any further kick: no message is stranded in the store."""
        if not hasattr(self, "w"):
            return
        while self.writes:
            if not self.writes[0].ran:
                self.store_runs_write()
            self._answer(self.writes.pop(0))
        if self.read is not None:
            self.w.read_failed()
        for _ in range(1000):
            if self.w.idle() and not self.unacked:
                break
            limit = self.w.read_limit()
            if limit:
                self.w.read_done(self._pending(limit, self.w.newest))
            self.now += TIMEOUT
            for m in self.w.due(self.now):
                if m.sequence not in self.sent_ever:
                    self.sent_ever.add(m.sequence)
                    self.first_sent.append(m.sequence)
                self.unacked.pop(m.sequence, None)
                self.w.acked(m.message_id)
        assert not self.unacked
        assert self.first_sent == sorted(self.first_sent) == sorted(self.sent_ever)


WindowModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
test_the_window_against_a_model_store = WindowModel.TestCase


def _model(limit: int = 3) -> WindowModel:
    model = WindowModel()
    model.setup(limit=limit)
    model.ask_read()
    model.store_runs_read()
    model.read_answered(fail=False)  # connected, read the (empty) store
    return model


def test_model_a_claim_answered_during_a_read_skips_nothing() -> None:
    """The store ran the read (holding X) before an enqueue's claim of A, whose
    answer comes first. Taken, A would have made X look old for good."""
    model = _model()
    model.kick()
    model.enqueue(n=1)  # X: not claimed (backlog)
    model.ask_read()
    model.store_runs_read()
    model.read_answered(fail=False)  # empty: X's write has not run
    model.enqueue(n=1)  # A: claimed
    assert model.writes[-1].claim
    model.store_runs_write()
    model.write_answered()  # X's: a kick
    model.ask_read()
    model.store_runs_read()  # holds X
    model.store_runs_write()  # A's claim
    model.write_answered()
    model.read_answered(fail=False)
    model.teardown()


def test_model_a_message_queued_during_a_read_is_not_stranded() -> None:
    model = _model()
    model.kick()
    model.ask_read()
    model.store_runs_read()  # empty
    model.enqueue(n=1)
    model.store_runs_write()
    model.write_answered()  # its kick lands while the read is in flight
    model.read_answered(fail=False)
    model.teardown()
