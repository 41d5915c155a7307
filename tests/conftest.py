"""Shared fixtures: a real simulator and real brokers on loopback."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace

import pytest

from broker.app import BrokerApp
from broker.config import Settings
from broker.lifecycle.policy import LifecyclePolicy
from broker.simulator import Simulator, SimulatorConfig
from broker.store.base import Store
from tests.helpers import FAST_POLICY, describe_tasks

BrokerFactory = Callable[..., Awaitable[BrokerApp]]


@pytest.fixture(autouse=True, scope="session")
def _no_real_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`broker serve` without a store flag writes into its data directory: never let a
    test's broker process use the real user data folder (tests that start one give
    it a directory of its own; this is the net under them)."""
    saved = os.environ.get("BROKER_DATA_DIR")
    os.environ["BROKER_DATA_DIR"] = str(tmp_path_factory.mktemp("broker-data"))
    yield
    if saved is None:
        os.environ.pop("BROKER_DATA_DIR", None)
    else:
        os.environ["BROKER_DATA_DIR"] = saved


TASKS_DUMP_AT = 0.8
"""Of a test's timeout: when its asyncio tasks are printed if it still runs."""


def _running_loop_of_main_thread() -> asyncio.AbstractEventLoop | None:
    """The loop the main thread is running, found on its stack (from another thread)."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, asyncio.AbstractEventLoop):
            return candidate
        frame = frame.f_back
    return None


def _dump_tasks() -> None:
    if sys.__stderr__ is not None:
        sys.__stderr__.write(f"\n+++ asyncio tasks of a test near its timeout +++\n"
                             f"{describe_tasks()}\n")


@pytest.fixture(autouse=True)
def _tasks_before_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """pytest-timeout prints only threads, and a hung asyncio test shows an idle loop
    there; this prints every task's stack (where each awaits) shortly before."""
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(
        request.config.getini("timeout") or 0)
    if timeout <= 0:
        yield
        return

    def fire() -> None:
        loop = _running_loop_of_main_thread()
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_dump_tasks)

    timer = threading.Timer(timeout * TASKS_DUMP_AT, fire)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture
def sim_config() -> SimulatorConfig:
    return SimulatorConfig(idle_timeout_s=5.0, qr_interval_s=5.0, qr_max=5, receipt_delay_s=0.0)


@pytest.fixture
async def sim(sim_config: SimulatorConfig) -> AsyncIterator[Simulator]:
    async with Simulator(sim_config) as simulator:
        yield simulator


@pytest.fixture
async def make_broker(sim: Simulator) -> AsyncIterator[BrokerFactory]:
    apps: list[BrokerApp] = []

    async def factory(policy: LifecyclePolicy | None = None, *, store: Store | None = None,
                      **overrides: object) -> BrokerApp:
        """A started broker on the simulator (fast policy); `store`: another than
        the settings' memory store."""
        settings = Settings(listen="127.0.0.1:0", upstream_url=sim.url,
                            lifecycle=policy or FAST_POLICY, ack_timeout_s=1.0,
                            connect_timeout_s=2.0)
        settings = replace(settings, **overrides)  # type: ignore[arg-type]
        app = BrokerApp(settings, store=store)
        await app.start()
        apps.append(app)
        return app

    yield factory
    for app in reversed(apps):
        await app.stop()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> BrokerApp:
    return await make_broker()
