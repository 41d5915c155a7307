"""Engines: what sessions' upstream connections run on, chosen once per process.

`select_engine(settings)` is the one place that maps `--engine` to a strategy;
the app starts what it returns and hands its provider to the session manager,
which never asks which engine it has (docs/architecture.md, "Engines").

- ``sim``: the embedded simulator, spoken to with protocol v1 (the default
  without ``--upstream-url``);
- ``ws``: a protocol-v1 upstream at ``--upstream-url`` (the default with it);
- ``baileys``: real WhatsApp through the supervised Node.js bridge, from
  `broker.engines.baileys`, imported only when chosen, which must define
  ``create(options: EngineOptions) -> Engine``.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from prometheus_client.registry import Collector

from broker.config import Settings
from broker.datadir import SIMULATOR_STATE_NAME, ensure_dir
from broker.engines.status import EngineStatus
from broker.simulator import Simulator, SimulatorConfig
from broker.upstream.null import NullProvider, is_null
from broker.upstream.provider import Provider
from broker.upstream.websocket import WebsocketProvider

log = logging.getLogger(__name__)

ENGINES = ("sim", "ws", "baileys")

BAILEYS_RATE_LIMIT = 1.0
"""Messages per second per session on the baileys engine unless --rate-limit says
otherwise: WhatsApp restricts and bans numbers that send in bursts, new ones most
of all; one a second with a burst of BAILEYS_RATE_BURST stays well inside what a
person's phone does, and a worker that sends faster gets RESOURCE_EXHAUSTED with
the wait, never a ban."""
BAILEYS_RATE_BURST = 5


class EngineError(ValueError):
    """The engine cannot be used as configured (the message names the fix)."""


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is built from: the process's settings (among them
    `connect_timeout_s`, `wa_version`, `baileys_ws_url`, `data_dir`,
    `instance_id`) and the client name it announces upstream."""

    settings: Settings
    client: str


class Engine(Protocol):
    name: str
    """"sim", "ws" or "baileys": what Health reports for every session."""
    simulator: Simulator | None
    """The embedded simulator this engine runs, if any (the demo and tests drive it)."""

    async def start(self) -> Provider:
        """Start what the engine needs (a simulator, a bridge); return the provider."""
        ...

    async def stop(self) -> None:
        """Stop what `start` started (after every session was handed over)."""
        ...

    def collectors(self) -> list[Collector]:
        """Prometheus collectors of what the engine runs (the bridge's state)."""
        ...

    def status(self) -> EngineStatus:
        """Whether what the engine runs is up, for Health."""
        ...


class WsEngine:
    """A protocol-v1 upstream that someone else runs."""

    name = "ws"
    simulator: Simulator | None = None

    def __init__(self, options: EngineOptions, url: str) -> None:
        self._options = options
        self.url = url
        self._started_at = 0.0

    async def start(self) -> Provider:
        settings = self._options.settings
        self._started_at = time.time()
        if is_null(self.url):  # bench-only: sessions with no socket (broker.upstream.null)
            log.warning("upstream %s: the null engine (benchmarks only; nothing is "
                        "delivered anywhere)", self.url)
            return NullProvider()
        return WebsocketProvider(self.url, connect_timeout_s=settings.connect_timeout_s,
                                 client=self._options.client)

    async def stop(self) -> None:
        return None

    def collectors(self) -> list[Collector]:
        return []

    def status(self) -> EngineStatus:
        """Nothing of ours runs: the upstream's own reachability shows per session."""
        return EngineStatus(self.name, bool(self._started_at),
                            "protocol-v1 upstream (no process of the broker's own)",
                            since=self._started_at)


class SimEngine:
    """The embedded simulator, started with the broker and stopped with it."""

    name = "sim"

    def __init__(self, options: EngineOptions) -> None:
        self._options = options
        self.simulator: Simulator | None = None
        self._started_at = 0.0

    async def start(self) -> Provider:
        settings = self._options.settings
        state = None
        if settings.data_dir:  # like a real upstream, it remembers its logins
            state = str(ensure_dir(Path(settings.data_dir)) / SIMULATOR_STATE_NAME)
        simulator = Simulator(SimulatorConfig(state_path=state))
        await simulator.start(settings.simulator_host, settings.simulator_port)
        self.simulator = simulator
        self._started_at = time.time()
        log.info("embedded simulator upstream at %s (control: %s)", simulator.url,
                 simulator.control_url)
        return WebsocketProvider(simulator.url, connect_timeout_s=settings.connect_timeout_s,
                                 client=self._options.client)

    async def stop(self) -> None:
        if self.simulator is not None:
            await self.simulator.stop()

    def collectors(self) -> list[Collector]:
        return []

    def status(self) -> EngineStatus:
        sim = self.simulator
        if sim is None:
            return EngineStatus(self.name, False, "embedded simulator not started")
        return EngineStatus(self.name, True, f"embedded simulator at {sim.url}",
                            since=self._started_at)


def engine_name(settings: Settings) -> str:
    """The engine `settings` ask for: `engine`, else ws with an upstream URL, else sim."""
    name = settings.engine or ("ws" if settings.upstream_url else "sim")
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    return name


def resolve(settings: Settings) -> Settings:
    """Settings with the engine and its defaults filled in (the rate limit)."""
    name = engine_name(settings)
    if name == "ws" and not settings.upstream_url:
        raise EngineError("--engine ws needs --upstream-url (BROKER_UPSTREAM_URL), the "
                          "protocol-v1 websocket URL of the upstream")
    if name != "ws" and settings.upstream_url:
        raise EngineError(f"--upstream-url is for --engine ws; --engine {name} does not use it")
    rate_limit, burst = settings.rate_limit, settings.rate_burst
    if rate_limit is None:
        rate_limit = BAILEYS_RATE_LIMIT if name == "baileys" else 0.0
        if name == "baileys" and not burst:
            burst = BAILEYS_RATE_BURST
    return replace(settings, engine=name, rate_limit=rate_limit, rate_burst=burst)


def select_engine(settings: Settings) -> Engine:
    """The engine of (resolved) `settings`, not started yet."""
    options = EngineOptions(settings, client=f"broker/{settings.instance_id}")
    name = engine_name(settings)
    if name == "ws":
        assert settings.upstream_url is not None
        return WsEngine(options, settings.upstream_url)
    if name == "sim":
        return SimEngine(options)
    try:
        module = importlib.import_module("broker.engines.baileys")
    except ModuleNotFoundError as exc:
        if exc.name != "broker.engines.baileys":
            raise
        raise EngineError(
            "--engine baileys is not available in this installation (broker.engines.baileys "
            "is missing); install a broker that includes the Baileys bridge") from None
    engine: Engine = module.create(options)
    return engine
