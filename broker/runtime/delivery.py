"""The I/O around one session's delivery window: outbox writes, the delivery
loop, and the Sends that wait for their acks.

`broker.runtime.window.DeliveryWindow` decides what to send and when to read
the store; this module only carries that out:

- the outbox writer: new messages (from Sends) and upstream acks go to the
  store in batches (`Batcher`), lingering under load (the window's
  `pipelined` rule). A write of new messages also claims them for the window
  when it may, so they are sent without asking the store again.
- the delivery loop: one task per connection while there is work (it ends
  when the window is idle; a kick starts it again): it reads the store when
  the window asks, sends what the window says is due, and sleeps until a
  kick, an ack or the next resend deadline.
- ack waiters: a Send that waits for its ack gets one plain future, settled
  by the ack's stored result, by `release_waiters`, or by its timer.
- status updates: every ack, refusal and receipt is also a status update of
  its message (`broker.runtime.updates`), appended in arrival order after its
  batch's outbox write, by a writer of their own: the next outbox write does
  not wait for them (with Redis, that second round trip per batch held up the
  next Sends). A resent message's repeated ack is stored once (updates are
  de-duplicated per message and status); updates the store could not take are
  held and go first with the next batch.

Acks reach `ack()` (and receipts `receipt()`) straight from the link reader,
not through the actor's inbox: they change no lifecycle state, and a hop per
frame through the inbox cost throughput. They enter the window (`acked`) once the store has recorded
them, so an ack the store lost is resent and acked again, never forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from broker.config import Settings
from broker.content import Content
from broker.content import decode as decode_content
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle.health import SessionStats
from broker.runtime import updates
from broker.runtime.batching import Batcher
from broker.runtime.mailbox import Wake, settle
from broker.runtime.updates import MessageStatus
from broker.runtime.window import DeliveryWindow
from broker.store.base import (
    UPDATES,
    Accepted,
    DeliveryResult,
    NewEntry,
    NewMessage,
    OutboxBatch,
    Refusal,
    Store,
)
from broker.upstream.provider import Link, Outgoing

log = logging.getLogger(__name__)

STORE_RETRY_S = 1.0
"""How soon the delivery loop (and the updates writer) asks an unreachable store again."""
MAX_HELD_UPDATES = 10_000
"""Status updates held per session while the store is away; older ones are dropped."""

_Write = str | Refusal | NewEntry | NewMessage
"""An outbox write item: an ack (the message id), a refusal, a receipt (its status
update) or a new message."""


def _content(payload: bytes) -> Content | None:
    """A queued message's content; a payload this release cannot read (a store
    written by a newer one) goes out as its body alone, logged, not as a crash."""
    try:
        return decode_content(payload)
    except ValueError as exc:
        log.error("a queued message's content is unreadable, sending its body only: %s", exc)
        return None


class Delivery:
    """One session's outbox writer, delivery loop and ack waiters; its actor owns it."""

    __slots__ = (
        "_ack_waiters",
        "_batcher",
        "_claimed",
        "_clock",
        "_fence",
        "_held",
        "_idle_poll",
        "_link",
        "_not_owner",
        "_settings",
        "_spawn",
        "_stats",
        "_store",
        "_task",
        "_update_writer",
        "_wake",
        "_window",
        "session_id",
    )

    def __init__(
        self,
        session_id: str,
        *,
        store: Store,
        settings: Settings,
        stats: SessionStats,
        clock: Callable[[], float],
        fence: int | None,
        not_owner: Callable[[NotOwner], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        outbox_poll_s: float | None,
    ) -> None:
        """`not_owner`: told when the store refused a write as stale.
        `spawn`: runs the delivery loop as one of the actor's background tasks.
        `outbox_poll_s`: how often an idle loop looks at the outbox anyway (a kick
        from another instance may be lost on its way); None: every enqueue kicks
        the loop here."""
        self.session_id = session_id
        self._store = store
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._fence = fence
        self._not_owner = not_owner
        self._spawn = spawn
        self._idle_poll = outbox_poll_s
        self._wake = Wake()
        self._task: asyncio.Task[None] | None = None
        #: the connection to deliver on while the session is OPEN, else None
        self._link: Link | None = None
        #: the connection whose delivery took the outbox over (claim_outbox): a loop
        #: that ended idle and starts again on it needs no second take-over
        self._claimed: Link | None = None
        # Made on first use: ten thousand idle sessions should not carry them.
        self._batcher: Batcher[_Write, Accepted | None] | None = None
        self._update_writer: Batcher[list[NewEntry], None] | None = None
        self._held: list[NewEntry] = []
        """Status updates the store could not take yet (they go with the next batch)."""
        self._window: DeliveryWindow | None = None
        self._ack_waiters: dict[str, list[asyncio.Future[DeliveryResult | None]]] = {}

    @property
    def window(self) -> DeliveryWindow | None:
        """The delivery window (None until the session first delivered)."""
        return self._window

    # -- the loop -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No delivery loop runs: it ended with nothing queued and nothing in flight
        (or the session is not open)."""
        return self._task is None or self._task.done()

    def start(self, link: Link) -> None:
        """The session is OPEN on `link`: deliver from its oldest unacked message."""
        self.stop()
        self._link = link
        self._run()

    def stop(self) -> None:
        """The connection is gone (or fenced): stop delivering, forget what was held."""
        self._link = None
        self._claimed = None
        if self._window is not None:
            self._window.close()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    def kick(self) -> None:
        """A message was queued: wake the loop, or start it if it ended idle."""
        if self._window is not None:
            self._window.maybe_more()
        self._wake.set()
        task = self._task
        if (task is None or task.done()) and self._link is not None:
            self._run()

    def _run(self) -> None:
        window = self._window
        if window is None:
            window = self._window = DeliveryWindow(self._settings.send_window,
                                                   self._settings.ack_timeout_s)
        assert self._link is not None
        self._task = self._spawn(self._deliver(self._link, window, window.open()))

    async def _deliver(self, link: Link, window: DeliveryWindow, epoch: int) -> None:
        """Carry out the window's decisions on `link` until it is idle or closed."""
        try:
            await self._deliver_loop(link, window, epoch)
        finally:
            window.close(epoch)  # an idle session keeps no delivery state

    async def _deliver_loop(self, link: Link, window: DeliveryWindow, epoch: int) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        while window.epoch == epoch and window.is_open:
            wake.clear()
            try:
                if self._claimed is not link:
                    taken = await self._store.claim_outbox(self.session_id, fence=self._fence)
                    if self._link is link:
                        self._claimed = link
                    if taken:
                        log.info("session %s: resuming %d read but unacked messages",
                                 self.session_id, taken)
                await self._read(window, epoch)
            except NotOwner as exc:
                self._not_owner(exc)
                return
            except StoreUnavailable as exc:
                log.warning("session %s: outbox unreachable, delivery paused: %s",
                            self.session_id, exc)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            if window.epoch != epoch:
                return
            now = loop.time()
            due = [Outgoing(m.message_id, m.to, m.body,
                            None if m.content is None else _content(m.content))
                   for m in window.due(now)]
            if due:
                await link.send(due)  # all at once: one write for the burst
            wait = window.resend_in(now)
            if wait is None:
                wait = self._idle_poll
                if wait is None:
                    if not wake.is_set() and window.idle():
                        # Nothing queued, nothing in flight: end here rather than keep
                        # a parked task per idle session; kick() starts a new one.
                        return
                    continue
            if not await wake.wait(wait) and not window.in_flight:
                window.maybe_more()  # a kick from another instance may be lost

    async def _read(self, window: DeliveryWindow, epoch: int) -> None:
        limit = window.read_limit()
        if not limit:
            return
        try:
            fresh = await self._store.pending(self.session_id, limit, window.newest,
                                              fence=self._fence)
        except BaseException:
            if window.epoch == epoch:
                window.read_failed()
            raise
        if window.epoch == epoch:
            window.read_done(fresh)

    # -- the outbox writer ----------------------------------------------------

    @property
    def _writes(self) -> Batcher[_Write, Accepted | None]:
        """Acks (message ids) and new messages, written to the store in batches."""
        if self._batcher is None:
            self._batcher = Batcher(self._write_outbox, linger_s=self._settings.write_linger_s,
                                    loaded=self._pipelined)
        return self._batcher

    def _post_updates(self, entries: list[NewEntry]) -> None:
        """Hand a batch's status updates to their writer, in arrival order (an empty
        batch still retries the held ones)."""
        if self._update_writer is None:
            self._update_writer = Batcher(self._write_update_batches)
        self._update_writer.post(entries)

    async def _write_update_batches(self, batches: list[list[NewEntry]]) -> list[None]:
        await self._write_updates([entry for batch in batches for entry in batch])
        return [None] * len(batches)

    def _pipelined(self) -> bool:
        window = self._window
        return window is not None and window.pipelined(asyncio.get_running_loop().time())

    async def enqueue(self, message: NewMessage, *, linger: bool = True) -> Accepted:
        """Queue a Send's message (with the Sends and acks that arrive meanwhile, in
        one write) and get it delivered. Raises OutboxFull. `linger=False`: the
        message came with others (a many-Sends call's request), so its write need
        not wait for more."""
        outcome = await self._writes.submit(message, linger=linger)  # raises OutboxFull
        assert outcome is not None  # None answers only acks
        return outcome

    def ack(self, message_id: str) -> None:
        """Record an upstream ack (with the acks that arrive meanwhile, in one write)."""
        self._writes.post(message_id, linger=False)

    def refuse(self, refusal: Refusal) -> None:
        """Record that the upstream refused a message: settled, never sent again, and
        its waiting Sends answered with the refusal."""
        self._writes.post(refusal, linger=False)

    def receipt(self, message_id: str, status: MessageStatus) -> None:
        """Record a receipt (delivered, read, played) as the message's status update."""
        self._writes.post(updates.entry(message_id, status), linger=False)

    async def _write_updates(self, entries: list[NewEntry]) -> None:
        """Store a batch's status updates after its outbox write, in arrival order.
        Ones the store could not take are held and go first with the next batch
        (ACKs recorded meanwhile do not resend their messages, so nothing else
        would bring their updates back); a fenced write drops them."""
        held, self._held = self._held, []
        entries = held + entries
        if not entries:  # the held ones went with an earlier batch meanwhile
            return
        try:
            added = await self._store.add_entries(self.session_id, entries, self._clock(),
                                                  topic=UPDATES, fence=self._fence)
        except NotOwner as exc:
            self._not_owner(exc)
            return
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("session %s: status updates not stored", self.session_id)
            self._held = entries[-MAX_HELD_UPDATES:]
            if len(entries) > MAX_HELD_UPDATES:
                log.warning("session %s: %d status updates dropped, the store is away",
                            self.session_id, len(entries) - MAX_HELD_UPDATES)
            return
        delivered = sum(1 for e, r in zip(entries, added, strict=True)
                        if r is not None and updates.is_status(e, MessageStatus.DELIVERED))
        if delivered:
            self._stats.on_delivered(delivered, self._clock())

    async def drain(self) -> None:
        """Return once everything handed to the writers so far is written."""
        if self._batcher is not None:
            await self._batcher.drain()
        if self._update_writer is not None:
            await self._update_writer.drain()

    async def _write_outbox(self, items: list[_Write]) -> list[Accepted | BaseException | None]:
        """Write a batch of acks and new messages, then act on the answers.

        New messages are claimed for delivery in the same write while the window
        may take them (nothing older can be unread); the loop then sends them
        without asking the store again. Acks that cannot be stored leave their
        messages in the outbox: they are sent again after the ack timeout and
        the upstream acks the duplicate.
        """
        acks = [i for i in items if isinstance(i, str)]
        refusals = [i for i in items if isinstance(i, Refusal)]
        # Every ack, refusal and receipt is also its message's status update, in order.
        news = [updates.entry(i, MessageStatus.SERVER_ACK) if isinstance(i, str) else
                updates.entry(i.message_id, MessageStatus.REFUSED, i.code, i.reason)
                if isinstance(i, Refusal) else i
                for i in items if not isinstance(i, NewMessage)]
        messages = [i for i in items if isinstance(i, NewMessage)]
        if not (acks or refusals or messages):  # receipts alone: no outbox write
            self._post_updates(news)
            return [None] * len(items)
        window = self._window
        claim = bool(messages) and window is not None and window.may_claim()
        epoch = window.epoch if window is not None else 0
        try:
            done = await self._store.apply_outbox(
                self.session_id, OutboxBatch(acks, messages, claim, refusals),
                max_depth=self._settings.max_outbox, at=self._clock(), fence=self._fence,
            )
        except Exception as exc:
            if isinstance(exc, NotOwner):
                self._not_owner(exc)  # the Sends' messages go in unfenced (manager)
            elif not isinstance(exc, StoreUnavailable):
                log.exception("session %s: outbox write failed", self.session_id)
            if acks or refusals:
                log.warning("session %s: %d acks not recorded, will resend: %s",
                            self.session_id, len(acks) + len(refusals), exc)
            # The acks' updates come back with their resends; the receipts' would not.
            self._post_updates([i for i in items if isinstance(i, NewEntry)])
            return [exc if isinstance(i, NewMessage) else None for i in items]
        if done.acked:
            self._stats.on_acked(len(acks), self._clock())
            for result in done.acked[len(acks):]:
                if not result.ok:
                    self._stats.on_refused(result.refused_code, result.refused)
            window = self._window
            for result in done.acked:
                if window is not None:
                    window.acked(result.message_id)
                for waiter in self._ack_waiters.pop(result.message_id, ()):
                    settle(waiter, result)
            self._wake.set()
        fresh = sum(1 for o in done.accepted if isinstance(o, Accepted) and not o.duplicate)
        if any(isinstance(o, Accepted) and o.duplicate and o.result is None
               for o in done.accepted):
            self.kick()  # a retry of an unacked message: it may be unread (see the manager)
        if fresh:
            self._stats.on_accepted(fresh)
            if claim and window is not None and window.claimed(epoch, done.claimed, done.unread):
                self._wake.set()
            else:
                self.kick()  # the loop reads them from the store
        accepted = iter(done.accepted)
        if news or self._held:
            self._post_updates(news)
        return [next(accepted) if isinstance(i, NewMessage) else None for i in items]

    # -- ack waiters ----------------------------------------------------------

    async def wait_ack(self, message_id: str, timeout: float) -> DeliveryResult | None:
        """The ack of a message delivered here; None on timeout or on
        `release_waiters`. Call right after enqueueing, before yielding."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[DeliveryResult | None] = loop.create_future()
        waiters = self._ack_waiters.setdefault(message_id, [])
        waiters.append(done)
        timer = loop.call_later(timeout, settle, done, None)
        try:
            return await done
        finally:
            timer.cancel()
            if done in waiters:
                waiters.remove(done)
            if not waiters:
                self._ack_waiters.pop(message_id, None)

    def release_waiters(self) -> None:
        """Answer every waiting Send with None: the session needs a person, or this
        actor stopped owning (the manager then waits on the store)."""
        for waiters in self._ack_waiters.values():
            for waiter in waiters:
                settle(waiter, None)

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Stop delivering; write what the store was handed, within the timeout."""
        self.stop()
        # Messages already handed to the writer are written whatever happens to
        # this actor: their Sends are waiting for the answer. (An ack left
        # unrecorded is harmless: the next owner resends, the upstream re-acks.)
        if self._batcher is not None:
            drain = asyncio.ensure_future(self.drain())
            done, _ = await asyncio.wait([drain], timeout=drain_timeout_s)
            if not done:
                drain.cancel()
