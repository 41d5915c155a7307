"""Test helpers: fast lifecycle timings and bounded waits on real components."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from broker.app import BrokerApp
from broker.lifecycle.policy import LifecyclePolicy
from broker.lifecycle.states import State
from broker.simulator import Simulator

FAST_POLICY = LifecyclePolicy(
    backoff_initial_s=0.02,
    backoff_max_s=0.1,
    slow_backoff_initial_s=0.1,
    slow_backoff_max_s=0.3,
    conflict_retry_s=None,
    redial_max_s=0.02,
    # Wide enough never to slow a test down, on so every test runs through it.
    attempt_burst=100,
    attempt_rate_per_min=6000.0,
    max_attempts=0,
    keepalive_interval_s=None,
    keepalive_timeout_s=1.0,
    max_qr_codes=50,
)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll until predicate() holds; bounded so a broken broker fails, not hangs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def _awaits(task: asyncio.Task[Any]) -> list[str]:
    """Where a task waits, outermost first: its coroutine's chain of awaits (a task's
    own get_stack() gives only the outermost frame of a suspended coroutine)."""
    lines: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(lines) < 40:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return lines


def describe_tasks() -> str:
    """Every asyncio task of the running loop and where it awaits (for hung tests)."""
    out: list[str] = []
    for task in asyncio.all_tasks():
        out.append(repr(task)[:300])
        out.extend(_awaits(task))
    return "\n".join(out)


async def within(step: Awaitable[Any], timeout: float, what: str) -> Any:
    """Await a teardown step, bounded: on timeout fail with every task and where it
    awaits, which names the await that hangs (pytest-timeout shows only the idle loop)."""
    try:
        return await asyncio.wait_for(step, timeout)
    except TimeoutError:
        raise AssertionError(f"{what} did not end in {timeout}s; tasks:\n"
                             f"{describe_tasks()}") from None


def state_of(app: BrokerApp, session_id: str) -> State | None:
    assert app.manager is not None
    actor = app.manager.actors.get(session_id)
    return actor.state if actor else None


async def wait_state(app: BrokerApp, session_id: str, state: State, timeout: float = 10.0) -> None:
    await eventually(lambda: state_of(app, session_id) == state, timeout,
                     f"{session_id} to be {state.value} (is {state_of(app, session_id)})")


async def paired_session(app: BrokerApp, sim: Simulator, session_id: str,
                         tenant: str = "") -> None:
    """Create a session and pair it through the simulator's QR scan, as a person would."""
    assert app.manager is not None
    await app.manager.create(session_id, tenant)
    await wait_state(app, session_id, State.PAIRING)
    assert await sim.scan(session_id)
    await wait_state(app, session_id, State.OPEN)


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0,
                           what: str = "condition") -> None:
    """`eventually` for checks that must await (a gRPC call, a Redis read)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


STORES = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis),
          pytest.param("redis-cluster", marks=pytest.mark.redis)]
"""Parameters of a fixture that runs a broker on each store (`broker_on_store`)."""


async def broker_on_store(request: pytest.FixtureRequest,
                          make_broker: Callable[..., Awaitable[BrokerApp]],
                          tmp_path: Path, *, store_options: dict[str, Any] | None = None,
                          **settings: Any) -> BrokerApp:
    """A started broker on the store `request.param` names (one of STORES): memory,
    a SQLite file in `tmp_path`, the shared Redis or the shared Redis Cluster (the
    test module imports their fixtures). `store_options` go to the store, `settings`
    to the broker."""
    from broker.store.redis import RedisStore
    from tests.store.conftest import open_sqlite

    options = store_options or {}
    if request.param == "memory":
        return await make_broker(**settings)
    if request.param == "sqlite":
        return await make_broker(store=open_sqlite(tmp_path / "broker.db", **options),
                                 **settings)
    server = request.getfixturevalue(
        "shared_redis" if request.param == "redis" else "shared_redis_cluster")
    return await make_broker(store=RedisStore.from_url(server.url, ephemeral_key=True,
                                                       **options), **settings)
