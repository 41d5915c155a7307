"""The one place that knows what a store brings with it.

Opening a store URL (or wrapping a store a caller made) gives a `Backend`:
the store, where sessions run (the placement), how Sends are rate limited,
where other instances' status events come from, and what must happen before
anything listens. Nothing downstream asks which backend it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from broker.cluster.coordinator import Coordinator
from broker.cluster.tail import EventTail
from broker.config import Settings
from broker.datadir import sqlite_cipher, sqlite_path
from broker.runtime.bus import StatusBus
from broker.runtime.manager import SessionManager
from broker.runtime.placement import LocalPlacement, Placement, PlacementFactory
from broker.runtime.ratelimit import RateLimiter, rate_limiter
from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore, connect
from broker.store.redis.durability import inspect
from broker.store.sqlite import SqliteStore

log = logging.getLogger(__name__)


async def _nothing() -> None:
    return None


async def _in_memory() -> str:
    return "memory store: nothing survives the process; a crash or exit loses everything"


async def _synced() -> str:
    return ("SQLite store (synchronous=FULL): every accepted message was synced to disk "
            "first; a crash or power loss loses nothing accepted")


@dataclass(frozen=True)
class Backend:
    store: Store
    limiter: RateLimiter
    placement: PlacementFactory = LocalPlacement
    events: Callable[[StatusBus], EventTail] | None = None
    """Relays the status events every instance stores to this one's subscribers
    (None: this process makes them all)."""
    ready: Callable[[], Awaitable[None]] = _nothing
    """Run before anything listens (SQLite: take the database's lock)."""
    durability: Callable[[], Awaitable[str]] = _in_memory
    """What a crash can lose, said once at start (with warnings) and in Health."""


def open_store(settings: Settings) -> Store:
    url = settings.store_url
    if url in ("memory", "memory://", ""):
        return MemoryStore(event_log_size=settings.event_log_size,
                           inbound_redeliver_after_s=settings.inbound_redeliver_after_s,
                           inbound_retention_s=settings.inbound_retention_s)
    if url.startswith(("redis://", "rediss://", "unix://", "redis+cluster://",
                       "redis+sentinel://")):
        return RedisStore.from_url(url, key_prefix=settings.key_prefix,
                                   durability=settings.durability,
                                   event_log_size=settings.event_log_size,
                                   idempotency_ttl_s=settings.sent_retention_s,
                                   inbound_redeliver_after_s=settings.inbound_redeliver_after_s,
                                   inbound_retention_s=settings.inbound_retention_s,
                                   consumer=settings.instance_id or None)
    if url.startswith("sqlite://"):
        path = sqlite_path(url)
        return SqliteStore(path, cipher=sqlite_cipher(path),
                           event_log_size=settings.event_log_size,
                           idempotency_ttl_s=settings.sent_retention_s,
                           inbound_redeliver_after_s=settings.inbound_redeliver_after_s,
                           inbound_retention_s=settings.inbound_retention_s)
    raise ValueError(f"unsupported store URL {url!r} (use memory://, sqlite:///path/to/broker.db "
                     "redis://host:port/db, redis+cluster://host:port[,host:port...] or "
                     "redis+sentinel://host:port[,host:port...]/service_name[/db])")


def open_backend(settings: Settings, store: Store | None = None) -> Backend:
    """The backend of `settings.store_url`, or of a store the caller opened."""
    store = store or open_store(settings)
    if isinstance(store, RedisStore):
        return _shared(store, settings)
    if isinstance(store, SqliteStore):
        return Backend(store, rate_limiter(settings), ready=store.open, durability=_synced)
    return Backend(store, rate_limiter(settings))


def _shared(store: RedisStore, settings: Settings) -> Backend:
    """Several instances share this Redis: ownership goes by lease, status events
    come through the shared log, and Sends draw on one bucket per session."""

    url = settings.store_url
    # The heartbeat thread needs a client of its own: made from the URL the store was
    # opened from (a store handed in by a caller keeps it on the event loop).
    own_client = ((lambda: connect.open_client(url))
                  if url.startswith(("redis://", "rediss://", "unix://", connect.CLUSTER_SCHEME,
                                     connect.SENTINEL_SCHEME)) else None)

    def placement(manager: SessionManager) -> Placement:
        return Coordinator(manager, store.client, instance_id=settings.instance_id,
                           lease_ttl_s=settings.lease_ttl_s, key_prefix=settings.key_prefix,
                           heartbeat_client=own_client)

    async def durability() -> str:
        report = await inspect(store.client, store.durability.mode)
        for warning in report.warnings:
            log.warning("%s", warning)
        return report.summary

    return Backend(
        store, rate_limiter(settings, redis=store.client, keys=store.keys),
        placement=placement, events=lambda bus: EventTail(store, bus), durability=durability,
    )
