"""Claims, keeps, fences and hands over session leases for one broker instance.

Balanced claiming: each instance owns at most its fair share,
ceil(enabled sessions / live instances), and tries candidates in rendezvous-
hash order so instances rarely contend for the same session. An instance
above its share sheds one session per round, closing the upstream connection
before releasing the lease, so the next owner never meets a live connection.

The idle cost is per instance, not per session (`broker.cluster.rules`): one
heartbeat keeps every lease this instance holds; a round rereads the session
records only when their version moved unannounced and every lease only after
a change, until all are held, each full read at most once per
`rules.FULL_READ_EVERY` times its own duration. A created (or handed-over)
session is announced by id: every instance reads just that record, its first
choice claims it at once, and the others look at its lease after a grace
(`rules.Candidates`), so a session whose first choice is full waits a round,
not a full read; live state is written when it changes
(looked at once per period); requests for an
owned session arrive in this instance's inbox (`broker.cluster.inbox`), so no
outbox is polled.

Timing, with T the lease TTL (`docs` and the README state the same):

- the heartbeat runs on its own thread (`broker.cluster.heartbeat`) every T/5,
  timed from *before* each request, so neither a slow reply nor a long takeover
  makes the leases look fresher than Redis knows them to be, and a busy event
  loop does not starve it; it renews only while the fence loop (on the event
  loop) keeps ticking, so a wedged process loses its claim;
- leases whose heartbeat was not confirmed for T/2 are fenced: the fence loop
  (every T/20, never waiting on Redis) aborts the upstream sockets of *every*
  session at once, then drains what it can in the background; the sockets are
  gone within T/20 + one event-loop turn, well before the claim expires at T
  and anyone may take a lease over;
- every owner write carries the lease's fencing token, so whatever a
  fenced (or frozen, then resumed) instance still tries to write is refused
  by the store (`NotOwner`), and the actor that hears it stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.cluster import rules
from broker.cluster.heartbeat import Heartbeat
from broker.cluster.inbox import Inbox
from broker.cluster.lease import Lease, LeaseClient
from broker.cluster.live import LiveReporter
from broker.cluster.membership import Membership
from broker.errors import StoreUnavailable
from broker.lifecycle import inputs
from broker.runtime.actor import SessionActor
from broker.runtime.manager import SessionManager
from broker.runtime.placement import Op
from broker.store.base import SessionRecord, StatusEvent
from broker.store.redis.codecs import text
from broker.store.redis.keys import RedisKeys

log = logging.getLogger(__name__)
_REDIS_ERRORS = (rexc.RedisError, OSError, StoreUnavailable, asyncio.TimeoutError)


class Coordinator:
    """The leased placement (`broker.runtime.placement.Placement`): Redis leases
    decide which instance owns each session."""

    shared = True
    #: requests from other instances arrive in this instance's inbox: no polling
    outbox_poll_s: float | None = None

    def __init__(
        self,
        manager: SessionManager,
        client: aioredis.Redis,
        *,
        instance_id: str,
        lease_ttl_s: float,
        key_prefix: str = "broker",
        heartbeat_client: Callable[[], Any] | None = None,
    ) -> None:
        """`heartbeat_client`: makes a Redis client like `client` for the heartbeat
        thread (None: the heartbeat runs on this event loop)."""
        self.manager = manager
        self.client = client
        self.instance_id = instance_id
        self.keys = RedisKeys(key_prefix)
        self.leases = LeaseClient(client, keys=self.keys, instance_id=instance_id)
        self.membership = Membership(client, keys=self.keys, instance_id=instance_id,
                                     ttl_s=lease_ttl_s)
        self.inbox = Inbox(client, keys=self.keys, instance_id=instance_id)
        self.ttl_s = lease_ttl_s
        self.interval_s = lease_ttl_s * rules.RENEW_EVERY
        self.liveness = rules.Liveness(lease_ttl_s)
        self.progress = rules.Progress(lease_ttl_s)
        self._heartbeat_client = heartbeat_client
        self.heartbeat: Heartbeat | None = None
        self.schedule = rules.RoundSchedule(quiet_s=self.interval_s)
        self.candidates = rules.Candidates(instance_id, grace_s=self.interval_s)
        self.live = LiveReporter(manager.store, instance_id, fenced=self.fenced)
        self.owned: dict[str, Lease] = {}
        self._records: dict[str, SessionRecord] = {}
        #: sessions announced by id whose record this instance has not read since
        self._announced: set[str] = set()
        self._live: list[str] = [instance_id]
        self._heartbeats: dict[str, float] = {}
        self._reported_at = -float("inf")
        self._joined = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._fence_task: asyncio.Task[None] | None = None
        self._shutdowns: set[asyncio.Task[None]] = set()
        self._pubsub: Any = None
        self._lock = asyncio.Lock()

    # lifecycle of the coordinator itself
    async def start(self) -> None:
        await self.membership.join()  # refuses a live duplicate of this instance id
        sent = time.monotonic()
        self._joined = await self.membership.heartbeat()
        if self._joined:
            self.liveness.renewed(sent)
        self.progress.tick(time.monotonic())
        loop = asyncio.get_running_loop()
        self.heartbeat = Heartbeat(
            self.membership, self._heartbeat_client, period_s=self.interval_s,
            liveness=self.liveness, progress=self.progress, joined=self._joined,
            on_lost=lambda: loop.call_soon_threadsafe(self._claim_lost),
            on_joined=lambda: loop.call_soon_threadsafe(self.wake))
        self.heartbeat.start()
        await self.inbox.open()
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.keys.control)
        self._fence_task = asyncio.create_task(self._fence_loop(), name="coordinator-fence")
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="coordinator-claim"),
            asyncio.create_task(self._listen(), name="coordinator-listen"),
            asyncio.create_task(self.inbox.run(self._on_command), name="coordinator-inbox"),
        ]
        await self._announce("rebalance")

    async def stop(self) -> None:
        """Graceful shutdown: hand every session over at once instead of after a TTL.

        The heartbeat and fencing keep running until every session is released or
        fenced, so a session whose release hangs (Redis stalled) is still
        fenced in time; every upstream connection is closed in parallel.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks)
        async with self._lock:
            await asyncio.gather(*(self._release(sid, announce=False) for sid in list(self.owned)))
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self._shutdowns:
            await asyncio.wait(tuple(self._shutdowns))
        if self._fence_task is not None:
            self._fence_task.cancel()
            await asyncio.wait([self._fence_task])
        with contextlib.suppress(*_REDIS_ERRORS):
            async with asyncio.timeout(self.ttl_s / 2):
                await self._leave()
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                async with asyncio.timeout(self.ttl_s / 2):
                    await self._pubsub.aclose()

    async def _leave(self) -> None:
        await self.membership.leave()
        await self._announce("rebalance")

    # what the manager and actors ask
    def may_connect(self, session_id: str) -> bool:
        return session_id in self.owned and self.liveness.fresh(time.monotonic())

    def is_live(self, instance_id: str) -> bool:
        """Whether an owner named in a live report still runs (as of the last round)."""
        return instance_id in self._live

    def fenced(self, session_id: str) -> None:
        """An actor was refused a write as stale: the lease is someone else's."""
        log.warning("session %s: a newer owner holds the lease; letting go", session_id)
        self._lose([session_id])

    async def wait_released(self, session_id: str) -> None:
        """Until no live instance holds the lease (a dead owner's lease counts as free)."""
        deadline = time.monotonic() + self.ttl_s * 2
        while time.monotonic() < deadline:
            try:
                holder = await self.leases.holder(session_id)
                if holder is None or (holder != self.instance_id
                                      and not await self.membership.claimed([holder])):
                    return
            except _REDIS_ERRORS as exc:
                raise StoreUnavailable(f"cannot reach Redis to coordinate: {exc}") from exc
            await asyncio.sleep(self.ttl_s / 20)

    def publish(self, event: StatusEvent) -> None:
        """Nothing to do: every instance's EventTail relays the shared event log."""

    async def activate(self, record: SessionRecord) -> None:
        """Name the session: its first choice claims it without a full read."""
        await self._announce("rebalance", record.session_id)

    async def forward(self, op: Op, session_id: str) -> bool:
        """Put the request in the owner's inbox; with no owner, the next one reads
        the session's outbox and stored state when it takes the lease."""
        try:
            holder = await self.leases.holder(session_id)
            if holder is not None:
                await self.inbox.post(holder, op.value, session_id)
        except _REDIS_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis to coordinate: {exc}") from exc
        return True

    async def _announce(self, op: str, session_id: str = "") -> None:
        try:
            message = json.dumps({"op": op, "session_id": session_id})
            await self.client.publish(self.keys.control, message)
        except _REDIS_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis to coordinate: {exc}") from exc

    def wake(self, *, changed: bool = True) -> None:
        """Run a round soon; `changed`: something may have moved that only a
        survey of every lease finds (members, a release, a lost lease)."""
        if changed:
            self.schedule.changed()
        self._wake.set()

    # loops
    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()  # before: a wake during the round runs one more
            try:
                async with self._lock:
                    await self._round()
            except _REDIS_ERRORS as exc:
                log.warning("coordination round failed (Redis unreachable?): %s", exc)
            except Exception:
                log.exception("coordination round failed")
            # Wakes come with every created session: coalesce them a little.
            await asyncio.sleep(rules.MIN_ROUND_GAP_S)
            wait = rules.next_round_in(self.interval_s, self._heartbeats, me=self.instance_id,
                                       ttl_s=self.ttl_s, now=time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    def _claim_lost(self) -> None:
        """The heartbeat found the claim gone: every lease may be someone else's."""
        self._lose(list(self.owned))
        if self.heartbeat is not None:
            self.heartbeat.loss_handled()  # only now may it join again

    async def _fence_loop(self) -> None:
        """Independent of Redis round trips, which may hang while Redis is away; its
        ticks are the progress the heartbeat thread renews on."""
        while True:
            await asyncio.sleep(self.ttl_s * rules.FENCE_CHECK_EVERY)
            now = time.monotonic()
            self.progress.tick(now)
            if self.liveness.must_fence(now) and self.owned:
                stale = sorted(self.owned)
                log.warning("heartbeat not confirmed for %.1fs; fencing myself: %d "
                            "sessions (%s)", self.liveness.fence_after_s, len(stale),
                            ", ".join(stale[:10]))
                self._lose(stale)

    async def _listen(self) -> None:
        assert self._pubsub is not None
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except _REDIS_ERRORS:
                await asyncio.sleep(self.interval_s)
                continue
            if message is None:
                continue
            try:
                data = json.loads(message["data"])
                op, session_id = str(data["op"]), str(data.get("session_id", ""))
            except (ValueError, KeyError, TypeError):
                continue
            try:
                await self._on_command(op, session_id)
            except _REDIS_ERRORS as exc:
                log.warning("session %s: %s failed: %s", session_id, op, exc)

    async def _on_command(self, name: str, session_id: str) -> None:
        if name == "rebalance":
            if session_id:  # read and looked at by id: no survey of every lease
                now = time.monotonic()
                self._announced.add(session_id)
                self.candidates.announced(session_id, self._live, now)
                self.schedule.heard(now)
            self.wake(changed=not session_id)
            return
        try:
            op = Op(name)
        except ValueError:
            return
        actor = self.manager.actors.get(session_id)
        if actor is None or session_id not in self.owned:
            return
        match op:
            case Op.KICK:
                actor.kick()
            case Op.STOP:
                await actor.command(inputs.Stop())
                self.wake()
            case Op.RESTART:
                await self.manager.restart_local(actor)
            case Op.LOGOUT:
                await actor.command(inputs.Logout())
            case Op.DELETE:
                async with self._lock:
                    await self._release(session_id)

    # one round: drop, shed or claim (the heartbeat runs on its own)
    async def _round(self) -> None:
        now = time.monotonic()
        self._heartbeats = await self.membership.live()
        self._live = sorted(self._heartbeats)
        self.schedule.members(self._live)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.sessions_version)
            pipe.get(self.keys.leases_version)  # two slots on a cluster: no MGET
            raw, released = await pipe.execute()
        version = None if raw is None else text(raw)
        self.schedule.releases(None if released is None else text(released))
        if self.schedule.reload_due(version, now):
            heard = set(self._announced)
            started = time.monotonic()
            records = await self.manager.store.list_sessions()
            self._records = {r.session_id: r for r in records if r.enabled}
            self._announced -= heard  # those heard during the read are read by id
            self.candidates.keep_only(self._records.keys() | self._announced)
            self.schedule.loaded(version, now, time.monotonic() - started)
        if self._announced:
            await self._read_announced(sorted(self._announced))
        for session_id in [s for s in self.owned if s not in self._records]:
            await self._release(session_id)
        if now - self._reported_at >= self.interval_s:  # O(owned): not every woken round
            self._reported_at = now
            await self.live.report(self.owned, self.manager.actors)
        share = rules.fair_share(len(self._records), len(self._live))
        if len(self.owned) > share:
            victim = rules.shed_victim(self.instance_id, self.owned)
            log.info("owning %d sessions, fair share %d: handing %s over",
                     len(self.owned), share, victim)
            await self._release(victim)
            return
        if len(self.owned) >= share or not self.liveness.fresh(time.monotonic()):
            return
        if self.schedule.scan_due(now):
            settled, read_s = await self._claim(list(self._records.values()), share)
            self.schedule.scanned(now, settled, read_s)
        due = self.candidates.due(time.monotonic(), share - len(self.owned))
        if due and self.liveness.fresh(time.monotonic()):
            await self._claim([self._records[s] for s in due if s in self._records], share)

    async def _read_announced(self, session_ids: list[str]) -> None:
        """Read the records of sessions announced by id: enabled ones join the
        known records (and stay candidates), the others leave them."""
        for start in range(0, len(session_ids), rules.CLAIM_BATCH * 8):
            chunk = session_ids[start:start + rules.CLAIM_BATCH * 8]
            got = await asyncio.gather(*(self.manager.store.get_session(s) for s in chunk))
            for session_id, record in zip(chunk, got, strict=True):
                self._announced.discard(session_id)
                if record is not None and record.enabled:
                    self._records[session_id] = record
                else:
                    self._records.pop(session_id, None)
                    self.candidates.settled([session_id])

    async def _claim(self, records: list[SessionRecord], share: int) -> tuple[bool, float]:
        """Take free and orphaned leases among `records`, up to the fair share.
        Whether every one of them is held by a live instance, and how long reading
        their leases took (what paces the next full survey; not the takeover)."""
        began = time.monotonic()
        self.candidates.settled(r.session_id for r in records if r.session_id in self.owned)
        by_id = {r.session_id: r for r in records if r.session_id not in self.owned}
        values = await self.leases.values(list(by_id))
        holders = {h for v in values.values() if (h := rules.holder_of(v)) is not None}
        claimed = await self.membership.claimed(holders - {self.instance_id})
        read_s = time.monotonic() - began
        found = rules.survey(values, me=self.instance_id, claimed=claimed, live=self._live)
        order = rules.claim_order(self.instance_id, found)
        # What is held by a live instance is settled; the rest stays a candidate
        # until taken (here, below) or found held.
        self.candidates.settled(s for s in values if s not in found.orphaned
                                and s not in found.free)
        self.candidates.found_free(order, time.monotonic())
        while order and len(self.owned) < share and self.liveness.fresh(time.monotonic()):
            # A few at a time, side by side: a failover of thousands of sessions
            # waits on round trips in parallel, never beyond the fair share.
            batch = order[:min(rules.CLAIM_BATCH, share - len(self.owned))]
            order = order[len(batch):]
            taken = await asyncio.gather(*(
                self.leases.acquire(sid, found.orphaned.get(sid, "")) for sid in batch))
            started: list[tuple[SessionRecord, int]] = []
            for session_id, lease in zip(batch, taken, strict=True):
                if lease is None:
                    continue
                self.owned[session_id] = lease
                self.candidates.settled([session_id])
                was = found.orphaned.get(session_id)
                if was:
                    log.info("session %s: took the lease over from %s, whose claim is gone "
                             "(token %d)", session_id, rules.holder_of(was), lease.token)
                else:
                    log.info("session %s: acquired lease (token %d)", session_id, lease.token)
                started.append((by_id[session_id], lease.token))
            # Their actors start side by side too (each reads its state first).
            await asyncio.gather(*(self.manager.run(r, fence=t) for r, t in started))
        return found.settled, read_s

    def _lose(self, session_ids: Iterable[str]) -> None:
        """The leases are (or may soon be) someone else's: stop all their I/O now.

        Synchronous up to the sockets: every affected connection is aborted
        before this returns; the rest of each shutdown runs in the background,
        all of them side by side.
        """
        self.schedule.changed()  # their leases still name us: look again once fresh
        for session_id in session_ids:
            self.owned.pop(session_id, None)
            self.live.forget(session_id)
            actor = self.manager.detach(session_id)
            if actor is not None:
                actor.fence_now()
                self._shut_down_later(actor)

    def _shut_down_later(self, actor: SessionActor) -> None:
        # Nothing is closed politely any more (already aborted); what is left
        # is writing what the store was handed, which a stale token refuses.
        task = asyncio.get_running_loop().create_task(
            actor.shutdown(close_timeout_s=0, drain_timeout_s=self.ttl_s / 2))
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdowns.discard)

    async def _release(self, session_id: str, *, announce: bool = True) -> None:
        """Hand a session over: close its upstream first, leave a live report that
        expires within a TTL, then free the lease."""
        actor = self.manager.detach(session_id)
        if actor is not None:
            # Bounded well inside the lease's remaining life; past it, aborted.
            await actor.shutdown(close_timeout_s=self.ttl_s / 10,
                                 drain_timeout_s=self.ttl_s / 4)
        lease = self.owned.pop(session_id, None)
        self.live.forget(session_id)
        if lease is None:
            return
        if actor is not None:
            await self.live.leaving(actor, lease, self.ttl_s)
        with contextlib.suppress(*_REDIS_ERRORS):
            async with asyncio.timeout(self.ttl_s / 4):
                await self.leases.release(lease)
            await self.client.incr(self.keys.leases_version)  # others look, even unannounced
            if announce:  # by id: the others look at just its lease
                await self._announce("rebalance", session_id)
