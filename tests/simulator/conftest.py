from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.simulator import Simulator, SimulatorConfig

FAST = SimulatorConfig(
    idle_timeout_s=0.3, qr_interval_s=0.05, qr_max=3, receipt_delay_s=0.01, seed=7
)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(FAST) as simulator:
        yield simulator
