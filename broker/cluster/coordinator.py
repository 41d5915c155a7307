"""Claims, renews, fences and hands over session leases for one broker instance.

Balanced claiming: each instance owns at most its fair share,
ceil(enabled sessions / live instances), and tries candidates in rendezvous-
hash order so instances rarely contend for the same session. An instance
above its share sheds one session per round, closing the upstream connection
before releasing the lease, so the next owner never meets a live connection.

Self-fencing: a lease not renewed for `fence_after_s` (well inside its TTL) is
given up locally, upstream connection closed, before Redis can hand it to
anyone else; and an actor asks `may_connect` before every connection attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rexc

from broker.cluster.lease import Lease, LeaseClient
from broker.cluster.membership import Membership
from broker.errors import StoreUnavailable
from broker.lifecycle import inputs as inp
from broker.runtime.manager import SessionManager
from broker.store.base import LiveState, SessionRecord

log = logging.getLogger(__name__)
_REDIS_ERRORS = (rexc.RedisError, OSError, StoreUnavailable, asyncio.TimeoutError)


def _rank(instance_id: str, session_id: str) -> bytes:
    return hashlib.blake2b(f"{instance_id}/{session_id}".encode(), digest_size=8).digest()


class Coordinator:
    def __init__(
        self,
        manager: SessionManager,
        client: aioredis.Redis,
        *,
        instance_id: str,
        lease_ttl_s: float,
        key_prefix: str = "broker",
    ) -> None:
        self.manager = manager
        self.client = client
        self.instance_id = instance_id
        self.leases = LeaseClient(client, key_prefix=key_prefix, instance_id=instance_id,
                                  ttl_s=lease_ttl_s)
        self.membership = Membership(client, key_prefix=key_prefix, instance_id=instance_id,
                                     ttl_s=lease_ttl_s)
        self.interval_s = lease_ttl_s / 5
        self.fence_after_s = lease_ttl_s * 0.6
        self.live_ttl_s = lease_ttl_s
        self.channel = f"{key_prefix}:control"
        self.owned: dict[str, Lease] = {}
        self._renewed_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        self._lock = asyncio.Lock()

    # lifecycle of the coordinator itself
    async def start(self) -> None:
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self.channel)
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="coordinator-claim"),
            asyncio.create_task(self._fence_loop(), name="coordinator-fence"),
            asyncio.create_task(self._listen(), name="coordinator-listen"),
        ]
        await self.publish("rebalance")

    async def stop(self) -> None:
        """Graceful shutdown: hand every session over at once instead of after a TTL."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._lock:
            for session_id in list(self.owned):
                await self._release(session_id, announce=False)
        with contextlib.suppress(*_REDIS_ERRORS):
            await self.membership.leave()
            await self.publish("rebalance")
        if self._pubsub is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self._pubsub.aclose()

    # what the manager and actors ask
    def may_connect(self, session_id: str) -> bool:
        renewed = self._renewed_at.get(session_id)
        return renewed is not None and time.monotonic() - renewed < self.fence_after_s

    async def publish(self, op: str, session_id: str = "") -> None:
        try:
            message = json.dumps({"op": op, "session_id": session_id})
            await self.client.publish(self.channel, message)
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

    async def _fence_loop(self) -> None:
        """Independent of Redis round trips, which may hang while Redis is away."""
        while True:
            await asyncio.sleep(self.interval_s / 2)
            now = time.monotonic()
            for session_id, renewed in list(self._renewed_at.items()):
                if now - renewed >= self.fence_after_s:
                    log.warning("session %s: lease not renewed for %.1fs; fencing myself",
                                session_id, now - renewed)
                    await self._lose(session_id)

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
            await self._on_command(op, session_id)

    async def _on_command(self, op: str, session_id: str) -> None:
        if op == "rebalance":
            self.wake()
            return
        actor = self.manager.actors.get(session_id)
        if actor is None or session_id not in self.owned:
            return
        if op == "kick":
            actor.kick()
        elif op == "stop":
            await actor.command(inp.Stop())
            self.wake()
        elif op == "restart":
            await self.manager.restart_local(actor)
        elif op == "logout":
            await actor.command(inp.Logout())
        elif op == "delete":
            async with self._lock:
                await self._release(session_id)

    # one round: renew, drop, shed or claim
    async def _round(self) -> None:
        await self.membership.heartbeat()
        renewed = await self.leases.renew(list(self.owned.values()))
        now = time.monotonic()
        for session_id, ok in renewed.items():
            if ok:
                self._renewed_at[session_id] = now
            else:
                log.warning("session %s: lease lost to another instance", session_id)
                await self._lose(session_id)
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
        for session_id in list(self.owned):
            actor = self.manager.actors.get(session_id)
            if actor is not None:
                live = LiveState(actor.state, self.instance_id, actor.last_activity, now)
                await self.manager.store.report_live(session_id, live, self.live_ttl_s)

    async def _claim(self, records: list[SessionRecord], share: int) -> None:
        candidates = [r for r in records if r.session_id not in self.owned]
        owners = await self._owners([r.session_id for r in candidates])
        free = sorted((r for r in candidates if owners.get(r.session_id) is None),
                      key=lambda r: _rank(self.instance_id, r.session_id))
        for record in free:
            if len(self.owned) >= share:
                return
            lease = await self.leases.acquire(record.session_id)
            if lease is None:
                continue
            self.owned[record.session_id] = lease
            self._renewed_at[record.session_id] = time.monotonic()
            log.info("session %s: acquired lease (token %d)", record.session_id, lease.token)
            await self.manager.run(record)

    async def _owners(self, session_ids: list[str]) -> dict[str, str | None]:
        pipe = self.client.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.get(self.leases._keys(session_id)[0])
        values = await pipe.execute() if session_ids else []
        return {sid: (v.decode() if isinstance(v, bytes) else v)
                for sid, v in zip(session_ids, values, strict=True)}

    async def _lose(self, session_id: str) -> None:
        """The lease is (or may soon be) someone else's: stop all I/O now."""
        self.owned.pop(session_id, None)
        self._renewed_at.pop(session_id, None)
        actor = self.manager.actors.pop(session_id, None)
        if actor is not None:
            # shutdown() closes the upstream without touching Redis, which may be
            # the very thing that is unreachable; the next owner records state.
            await actor.shutdown()

    async def _release(self, session_id: str, *, announce: bool = True) -> None:
        """Hand a session over: close its upstream first, then free the lease."""
        lease = self.owned.pop(session_id, None)
        self._renewed_at.pop(session_id, None)
        actor = self.manager.actors.pop(session_id, None)
        if actor is not None:
            await actor.shutdown()
        if lease is not None:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self.leases.release(lease)
                if announce:
                    await self.publish("rebalance")
