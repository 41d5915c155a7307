"""What Health says about an engine (its own module so engines import it freely)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStatus:
    """What Health says about the engine of the instance that answers."""

    name: str
    up: bool
    """False while the engine's own process is down (its sessions reconnect)."""
    detail: str
    """In plain words, e.g. "WhatsApp bridge up (pid 4242)"."""
    starts: int = 1
    """How often the engine's process was started (more than 1: it was restarted)."""
    since: float = 0.0
    """Since when `up` holds (Unix time; 0 before the start)."""
