"""Wires one broker process together from Settings: store, upstream, manager, API."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import replace

from broker.api.server import ApiServer
from broker.cluster.coordinator import Coordinator
from broker.cluster.tail import EventTail
from broker.config import Settings
from broker.runtime.manager import SessionManager
from broker.runtime.monitor import HealthMonitor
from broker.simulator import Simulator, SimulatorConfig
from broker.store.base import Store
from broker.store.memory import MemoryStore
from broker.store.redis import RedisStore
from broker.upstream.websocket import WebsocketProvider

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    url = settings.store_url
    if url in ("memory", "memory://", ""):
        return MemoryStore(event_log_size=settings.event_log_size,
                           inbound_redeliver_after_s=settings.inbound_redeliver_after_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore.from_url(url, key_prefix=settings.key_prefix,
                                   event_log_size=settings.event_log_size,
                                   inbound_redeliver_after_s=settings.inbound_redeliver_after_s,
                                   consumer=settings.instance_id or None)
    raise ValueError(f"unsupported store URL {url!r} (use memory:// or redis://host:port/db)")


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BrokerApp:
    """A running broker: start(), then stop(); tests run several side by side."""

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None) -> None:
        self.settings = settings or Settings()
        self._store = store
        self.simulator: Simulator | None = None
        self.manager: SessionManager | None = None
        self.api: ApiServer | None = None
        self.monitor: HealthMonitor | None = None
        self.coordinator: Coordinator | None = None
        self.tail: EventTail | None = None

    @property
    def address(self) -> str:
        assert self.api is not None
        return self.api.address

    async def start(self) -> None:
        settings = self.settings
        if not settings.instance_id:
            settings = replace(settings, instance_id=default_instance_id())
        if settings.upstream_url is None:
            self.simulator = Simulator(SimulatorConfig())
            await self.simulator.start(settings.simulator_host, settings.simulator_port)
            settings = replace(settings, upstream_url=self.simulator.url)
            log.info("embedded simulator upstream at %s (control: %s)",
                     self.simulator.url, self.simulator.control_url)
        assert settings.upstream_url is not None
        store = self._store or open_store(settings)
        provider = WebsocketProvider(settings.upstream_url,
                                     connect_timeout_s=settings.connect_timeout_s)
        self.manager = SessionManager(store, provider, settings)
        if isinstance(store, RedisStore):
            # Several instances may share this store: ownership goes by lease and
            # status events reach local subscribers through the shared log.
            self.tail = EventTail(store, self.manager.bus)
            await self.tail.start()
            self.coordinator = Coordinator(
                self.manager, store.client,
                instance_id=settings.instance_id,
                lease_ttl_s=settings.lease_ttl_s, key_prefix=settings.key_prefix,
            )
            self.manager.coordinator = self.coordinator
        await self.manager.start()
        self.api = ApiServer(self.manager, settings.listen)
        await self.api.start()
        self.monitor = HealthMonitor(self.manager, settings.health_interval_s)
        self.monitor.start()
        if self.coordinator is not None:
            await self.coordinator.start()
        log.info("broker listening on %s", self.api.address)

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.api is not None:
            await self.api.stop()
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.tail is not None:
            await self.tail.stop()
        if self.manager is not None:
            await self.manager.close()
            await self.manager.store.close()
        if self.simulator is not None:
            await self.simulator.stop()

    async def __aenter__(self) -> BrokerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
