"""Simulated upstream network for tests, demos and benchmarks (docs/protocol.md)."""

from broker.simulator.commands import ControlError
from broker.simulator.record import AcceptedMessage, LoginRecord
from broker.simulator.server import Faults, Simulator, SimulatorConfig

__all__ = [
    "AcceptedMessage",
    "ControlError",
    "Faults",
    "LoginRecord",
    "Simulator",
    "SimulatorConfig",
]
