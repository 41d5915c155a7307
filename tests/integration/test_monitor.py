"""The health monitor raises a recommendation in the log when a session needs a person."""

from __future__ import annotations

import logging

import pytest

from broker.app import BrokerApp
from broker.lifecycle.states import State
from broker.simulator import Simulator
from tests.helpers import paired_session, wait_state

SID = "962302"


async def test_monitor_logs_what_to_do_once_per_change(
    sim: Simulator, broker: BrokerApp, caplog: pytest.LogCaptureFixture
) -> None:
    assert broker.monitor is not None
    await paired_session(broker, sim, SID)
    caplog.set_level(logging.INFO, logger="broker.runtime.monitor")
    await broker.monitor.check()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    await sim.logout(SID)
    await wait_state(broker, SID, State.LOGGED_OUT)
    await broker.monitor.check()
    await broker.monitor.check()  # unchanged: not logged again
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "REPAIR_NEEDED" in warnings[0] and SID in warnings[0]
