"""Claims, renews, fences and hands over session leases for one broker instance.

Balanced claiming: each instance owns at most its fair share,
ceil(enabled sessions / live instances), and tries candidates in rendezvous-
hash order so instances rarely contend for the same session. An instance
above its share sheds one session per round, closing the upstream connection
before releasing the lease, so the next owner never meets a live connection.

Timing, with T the lease TTL (`docs` and the README state the same):

- renewal runs in its own task every T/5, timed from *before* each request,
  so neither a slow reply nor a long takeover makes a lease look fresher than
  Redis knows it to be;
- a lease not renewed for T/2 is fenced: the fence loop (every T/20, never
  waiting on Redis) aborts the upstream sockets of *every* such session at
  once, then drains what it can in the background; the sockets are gone
  within T/20 + one event-loop turn, well before Redis can grant the lease
  to anyone else at T;
- every owner write carries the lease's fencing token, so whatever a
  fenced (or frozen, then resumed) instance still tries to write is refused
  by the store (`NotOwner`), and the actor that hears it stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.cluster.lease import Lease, LeaseClient
from broker.cluster.membership import Membership
from broker.errors import NotOwner, StoreUnavailable
from broker.lifecycle import inputs as inp
from broker.runtime.actor import SessionActor
from broker.runtime.manager import SessionManager
from broker.runtime.placement import Op
from broker.store.base import LiveState, SessionRecord, StatusEvent
from broker.store.redis.keys import RedisKeys

log = logging.getLogger(__name__)
_REDIS_ERRORS = (rexc.RedisError, OSError, StoreUnavailable, asyncio.TimeoutError)

RENEW_EVERY = 1 / 5
"""Renewal period, as a fraction of the lease TTL."""
FENCE_AFTER = 1 / 2
"""A lease not renewed for this fraction of its TTL is given up locally."""
FENCE_CHECK_EVERY = 1 / 20
"""How often the fence loop looks, as a fraction of the TTL."""


def _rank(instance_id: str, session_id: str) -> bytes:
    return hashlib.blake2b(f"{instance_id}/{session_id}".encode(), digest_size=8).digest()


class Coordinator:
    """The leased placement (`broker.runtime.placement.Placement`): Redis leases
    decide which instance owns each session."""

    shared = True

    def __init__(
        self,
        manager: SessionManager,
        client: aioredis.Redis,
        *,
        instance_id: str,
        lease_ttl_s: float,
        key_prefix: str = "broker",
        pipeline_scripts: bool = True,
    ) -> None:
        """`pipeline_scripts`: False on Redis Cluster (see `LeaseClient`)."""
        self.manager = manager
        self.client = client
        self.instance_id = instance_id
        self.keys = RedisKeys(key_prefix)
        self.leases = LeaseClient(client, keys=self.keys, instance_id=instance_id,
                                  ttl_s=lease_ttl_s, pipeline_scripts=pipeline_scripts)
        self.membership = Membership(client, keys=self.keys, instance_id=instance_id,
                                     ttl_s=lease_ttl_s)
        self.ttl_s = lease_ttl_s
        self.interval_s = lease_ttl_s * RENEW_EVERY
        self.fence_after_s = lease_ttl_s * FENCE_AFTER
        self.live_ttl_s = lease_ttl_s
        #: a kick from another instance travels over pub/sub and may be lost
        self.outbox_poll_s = 2.0
        self.owned: dict[str, Lease] = {}
        self._renewed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._fence_task: asyncio.Task[None] | None = None
        self._shutdowns: set[asyncio.Task[None]] = set()
        self._pubsub: Any = None
        self._lock = asyncio.Lock()

    # lifecycle of the coordinator itself
    async def start(self) -> None:
        await self.membership.join()  # refuses a live duplicate of this instance id
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.keys.control)
        self._fence_task = asyncio.create_task(self._fence_loop(), name="coordinator-fence")
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="coordinator-claim"),
            asyncio.create_task(self._renew_loop(), name="coordinator-renew"),
            asyncio.create_task(self._listen(), name="coordinator-listen"),
        ]
        await self._announce("rebalance")

    async def stop(self) -> None:
        """Graceful shutdown: hand every session over at once instead of after a TTL.

        Renewal and fencing keep running until every session is released or
        fenced, so a session whose release hangs (Redis stalled) is still
        fenced in time; every upstream connection is closed in parallel.
        """
        claim, renew, listen = self._tasks
        for task in (claim, listen):
            task.cancel()
        await asyncio.wait([claim, listen])
        async with self._lock:
            await asyncio.gather(*(self._release(sid, announce=False) for sid in list(self.owned)))
        renew.cancel()
        await asyncio.wait([renew])
        if self._shutdowns:
            await asyncio.wait(tuple(self._shutdowns))
        if self._fence_task is not None:
            self._fence_task.cancel()
            await asyncio.wait([self._fence_task])
        with contextlib.suppress(*_REDIS_ERRORS):
            await asyncio.wait_for(self._leave(), self.ttl_s / 2)
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await asyncio.wait_for(self._pubsub.aclose(), self.ttl_s / 2)

    async def _leave(self) -> None:
        await self.membership.leave()
        await self._announce("rebalance")

    # what the manager and actors ask
    def may_connect(self, session_id: str) -> bool:
        renewed = self._renewed_at.get(session_id)
        return renewed is not None and time.monotonic() - renewed < self.fence_after_s

    def fenced(self, session_id: str) -> None:
        """An actor was refused a write as stale: the lease is someone else's."""
        log.warning("session %s: a newer owner holds the lease; letting go", session_id)
        self._lose([session_id])

    async def wait_released(self, session_id: str) -> None:
        deadline = time.monotonic() + self.ttl_s * 2
        while time.monotonic() < deadline:
            try:
                if await self.leases.holder(session_id) is None:
                    return
            except _REDIS_ERRORS as exc:
                raise StoreUnavailable(f"cannot reach Redis to coordinate: {exc}") from exc
            await asyncio.sleep(self.ttl_s / 20)

    def publish(self, event: StatusEvent) -> None:
        """Nothing to do: every instance's EventTail relays the shared event log."""

    async def activate(self, record: SessionRecord) -> None:
        await self._announce("rebalance")

    async def forward(self, op: Op, session_id: str) -> bool:
        await self._announce(op.value, session_id)
        return True

    async def _announce(self, op: str, session_id: str = "") -> None:
        try:
            message = json.dumps({"op": op, "session_id": session_id})
            await self.client.publish(self.keys.control, message)
        except _REDIS_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis to coordinate: {exc}") from exc

    def wake(self) -> None:
        self._wake.set()

    # loops
    async def _claim_loop(self) -> None:
        while True:
            try:
                async with self._lock:
                    await self._round()
            except _REDIS_ERRORS as exc:
                log.warning("coordination round failed (Redis unreachable?): %s", exc)
            except Exception:
                log.exception("coordination round failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def _renew_loop(self) -> None:
        """Renew every owned lease in one round trip per period, on its own."""
        while True:
            started = time.monotonic()
            try:
                await self._renew(started)
            except _REDIS_ERRORS as exc:
                log.warning("lease renewal failed (Redis unreachable?): %s", exc)
            except Exception:
                log.exception("lease renewal failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _renew(self, started: float) -> None:
        if not await self.membership.heartbeat():
            log.error("instance id %s is now held by another process: giving up every "
                      "session", self.instance_id)
            self._lose(list(self.owned))
            return
        leases = list(self.owned.values())
        results = await self.leases.renew(leases)
        lost = []
        for lease in leases:
            if self.owned.get(lease.session_id) is not lease:
                continue  # released or lost while the request was out
            if results.get(lease.session_id):
                self._renewed_at[lease.session_id] = started
            else:
                log.warning("session %s: lease lost to another instance", lease.session_id)
                lost.append(lease.session_id)
        self._lose(lost)

    async def _fence_loop(self) -> None:
        """Independent of Redis round trips, which may hang while Redis is away."""
        while True:
            await asyncio.sleep(self.ttl_s * FENCE_CHECK_EVERY)
            now = time.monotonic()
            stale = [sid for sid, renewed in self._renewed_at.items()
                     if now - renewed >= self.fence_after_s]
            if stale:
                log.warning("%d leases not renewed for %.1fs; fencing myself: %s",
                            len(stale), self.fence_after_s, ", ".join(sorted(stale)[:10]))
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
            self.wake()
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
                await actor.command(inp.Stop())
                self.wake()
            case Op.RESTART:
                await self.manager.restart_local(actor)
            case Op.LOGOUT:
                await actor.command(inp.Logout())
            case Op.DELETE:
                async with self._lock:
                    await self._release(session_id)

    # one round: drop, shed or claim (renewal runs on its own)
    async def _round(self) -> None:
        await self._report_live()
        live = await self.membership.live()
        records = [r for r in await self.manager.store.list_sessions() if r.enabled]
        enabled = {r.session_id for r in records}
        for session_id in [s for s in self.owned if s not in enabled]:
            await self._release(session_id)
        share = math.ceil(len(records) / max(1, len(live)))
        if len(self.owned) > share:
            victim = max(self.owned, key=lambda s: _rank(self.instance_id, s))
            log.info("owning %d sessions, fair share %d: handing %s over",
                     len(self.owned), share, victim)
            await self._release(victim)
            return
        if len(self.owned) < share:
            await self._claim(records, share)

    async def _report_live(self) -> None:
        """Publish each owned session's live state, expiring unless renewed."""
        now = time.time()
        for session_id, lease in list(self.owned.items()):
            actor = self.manager.actors.get(session_id)
            if actor is None:
                continue
            live = LiveState(actor.state, self.instance_id, actor.last_activity, now)
            try:
                await self.manager.store.report_live(session_id, live, self.live_ttl_s,
                                                     fence=lease.token)
            except NotOwner:
                self.fenced(session_id)

    async def _claim(self, records: list[SessionRecord], share: int) -> None:
        candidates = [r for r in records if r.session_id not in self.owned]
        holders = await self.leases.holders([r.session_id for r in candidates])
        free = sorted((r for r in candidates if holders.get(r.session_id) is None),
                      key=lambda r: _rank(self.instance_id, r.session_id))
        for record in free:
            if len(self.owned) >= share:
                return
            asked = time.monotonic()  # the lease runs from (at latest) now
            lease = await self.leases.acquire(record.session_id)
            if lease is None:
                continue
            self.owned[record.session_id] = lease
            self._renewed_at[record.session_id] = asked
            log.info("session %s: acquired lease (token %d)", record.session_id, lease.token)
            await self.manager.run(record, fence=lease.token)

    def _lose(self, session_ids: Iterable[str]) -> None:
        """The leases are (or may soon be) someone else's: stop all their I/O now.

        Synchronous up to the sockets: every affected connection is aborted
        before this returns; the rest of each shutdown runs in the background,
        all of them side by side.
        """
        for session_id in session_ids:
            self.owned.pop(session_id, None)
            self._renewed_at.pop(session_id, None)
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
        """Hand a session over: close its upstream first, then free the lease."""
        actor = self.manager.detach(session_id)
        if actor is not None:
            # Bounded well inside the lease's remaining life; past it, aborted.
            await actor.shutdown(close_timeout_s=self.ttl_s / 10,
                                 drain_timeout_s=self.ttl_s / 4)
        lease = self.owned.pop(session_id, None)
        self._renewed_at.pop(session_id, None)
        if lease is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await asyncio.wait_for(self.leases.release(lease), self.ttl_s / 4)
                if announce:
                    await self._announce("rebalance")
