"""Simulated upstream network for tests, demos and benchmarks (docs/protocol.md)."""

from broker.simulator.record import AcceptedMessage, LoginRecord
from broker.simulator.server import ControlError, Faults, Simulator, SimulatorConfig

__all__ = [
    "AcceptedMessage",
    "ControlError",
    "Faults",
    "LoginRecord",
    "Simulator",
    "SimulatorConfig",
]
