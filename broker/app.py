"""Wires one broker process together from Settings: store, upstream, manager, API."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import replace

from broker.api.auth import AuthInterceptor, Authorizer, check_exposure, store_tenants
from broker.api.server import ApiServer
from broker.api.tls import server_credentials
from broker.auth.tokens import TokenStore
from broker.backends import open_backend
from broker.cluster.tail import EventTail
from broker.config import Settings
from broker.dashboard.server import DashboardServer, check_embedded, local_target
from broker.engines import Engine, select_engine
from broker.engines import resolve as resolve_engine
from broker.ops import install_log_context
from broker.ops.metrics import BrokerMetrics
from broker.ops.webhooks import WebhookNotifier, WebhookPolicy, load_targets
from broker.runtime.manager import SessionManager
from broker.runtime.monitor import HealthMonitor
from broker.simulator import Simulator
from broker.store.base import Store

log = logging.getLogger(__name__)


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BrokerApp:
    """A running broker: start(), then stop(); tests run several side by side."""

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None) -> None:
        self.settings = settings or Settings()
        self._store = store
        self.engine: Engine | None = None
        self.simulator: Simulator | None = None
        """The embedded simulator of the sim engine (tests and the demo drive it)."""
        self.manager: SessionManager | None = None
        self.api: ApiServer | None = None
        self.monitor: HealthMonitor | None = None
        self.tail: EventTail | None = None
        self.dashboard: DashboardServer | None = None
        self.metrics: BrokerMetrics | None = None
        self.webhooks: WebhookNotifier | None = None
        self._opened: Store | None = None

    @property
    def address(self) -> str:
        assert self.api is not None
        return self.api.address

    async def start(self) -> None:
        settings = self.settings
        if not settings.instance_id:
            settings = replace(settings, instance_id=default_instance_id())
        settings = resolve_engine(settings)
        # Read before anything starts, so a bad file fails fast and leaks nothing.
        hooks = load_targets(settings.webhooks_file) if settings.webhooks_file else None
        # Security configuration fails the start before anything listens.
        tokens = TokenStore.open(settings.auth_tokens_file) if settings.auth_tokens_file else None
        check_exposure(settings.listen, tokens is not None)
        check_embedded(settings)  # the dashboard's own client must get in
        tls = server_credentials(settings.tls_cert_file, settings.tls_key_file,
                                 settings.tls_client_ca_file)
        engine = select_engine(settings)  # an engine that is not installed fails here
        backend = open_backend(settings, self._store)
        store = self._opened = backend.store
        # First: a second broker on one SQLite database stops here, before it binds
        # anything (the simulator's port would be taken too, less clearly).
        await backend.ready()
        durability = await backend.durability()
        log.info("%s", durability)
        try:
            provider = await engine.start()
        except BaseException:
            if self._store is None:  # ours: release the database (and its lock)
                await store.close()
            raise
        self.engine, self.simulator = engine, engine.simulator
        self.manager = SessionManager(store, provider, settings, placement=backend.placement,
                                      limiter=backend.limiter)
        install_log_context(self.manager)
        # Observers subscribe before any session starts, so they see its first events.
        if settings.metrics_listen:
            self.metrics = BrokerMetrics(self.manager)
            for collector in engine.collectors():  # e.g. the Baileys bridge's state
                self.metrics.registry.register(collector)
            self.metrics.start()
        if hooks:
            self.webhooks = WebhookNotifier(self.manager, hooks,
                                            WebhookPolicy.from_settings(settings))
            self.webhooks.start()
        if backend.events is not None:
            self.tail = backend.events(self.manager.bus)
            await self.tail.start()
        auth = [AuthInterceptor(Authorizer(tokens, store_tenants(store)))] if tokens else []
        # Metrics first, so they also time the calls that auth refuses.
        observe = [self.metrics.interceptor()] if self.metrics is not None else []
        self.api = ApiServer(self.manager, settings.listen, interceptors=[*observe, *auth],
                             credentials=tls, durability=durability, engine=engine.status)
        await self.api.start()
        if self.metrics is not None and settings.metrics_listen:
            await self.metrics.serve(settings.metrics_listen)
        self.monitor = HealthMonitor(self.manager, settings.health_interval_s)
        self.monitor.start()
        await self.manager.start()  # sessions start once the API can answer for them
        log.info("broker listening on %s", self.api.address)
        if settings.dashboard_listen:
            # A client of our own API, so it shows exactly what remote clients see.
            self.dashboard = DashboardServer(local_target(self.api.address),
                                             settings.dashboard_listen)
            await self.dashboard.start()

    async def stop(self) -> None:
        for observer in (self.webhooks, self.metrics):
            if observer is not None:
                await observer.stop()
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.monitor is not None:
            await self.monitor.stop()
        if self.api is not None:
            await self.api.stop()
        if self.manager is not None:
            await self.manager.close()  # hands every session over first
        if self.tail is not None:
            await self.tail.stop()
        if self._opened is not None:
            await self._opened.close()
        if self.engine is not None:
            await self.engine.stop()

    async def __aenter__(self) -> BrokerApp:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
