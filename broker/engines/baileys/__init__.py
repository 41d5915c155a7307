"""The Baileys engine: real WhatsApp logins through the supervised Node.js bridge.

`create(options)` is what the engine factory (`broker.engines`) calls for
`--engine baileys`. `start()` checks Node.js and the bridge's packages (a
clear error naming the fix otherwise), starts the bridge and returns the
provider; `stop()` stops the bridge with the broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.registry import Collector

from broker.engines.baileys.link import BridgeLink, BridgeProvider
from broker.engines.baileys.metrics import BridgeCollector
from broker.engines.baileys.supervisor import (
    BridgeExited,
    BridgeNotInstalled,
    BridgeState,
    BridgeSupervisor,
    check_installed,
)

__all__ = ["BaileysEngine", "BridgeExited", "BridgeLink", "BridgeNotInstalled", "BridgeProvider",
           "BridgeState", "BridgeSupervisor", "check_installed", "create", "parse_wa_version"]


from broker.engines.status import EngineStatus

if TYPE_CHECKING:
    from broker.engines import EngineOptions
    from broker.simulator import Simulator


def parse_wa_version(text: str | None) -> tuple[int, int, int] | None:
    """`2.3000.1023223821` -> (2, 3000, 1023223821); None or "" -> Baileys' bundled default."""
    if not text:
        return None
    parts = text.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--wa-version must look like 2.3000.1023223821, not {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


class BaileysEngine:
    name = "baileys"
    simulator: Simulator | None = None

    def __init__(self, *, wa_version: str | None = None, ws_url: str | None = None,
                 connect_timeout_s: float = 10.0, max_media_bytes: int = 16 << 20) -> None:
        self._version = parse_wa_version(wa_version)
        self._max_media_bytes = max_media_bytes
        self._ws_url = ws_url or None
        self._connect_timeout_s = connect_timeout_s
        self.supervisor: BridgeSupervisor | None = None

    async def start(self) -> BridgeProvider:
        self.supervisor = BridgeSupervisor(wa_version=self._version, ws_url=self._ws_url,
                                           max_media_bytes=self._max_media_bytes)
        await self.supervisor.start()
        return BridgeProvider(self._where, connect_timeout_s=self._connect_timeout_s)

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()

    def _where(self) -> tuple[str, str] | str:
        sup = self.supervisor
        if sup is None or not sup.state.up:
            return sup.state.reason if sup is not None else "WhatsApp bridge not started"
        return sup.socket_path, sup.secret

    def bridge_state(self) -> BridgeState | None:
        """The bridge's state for metrics (None before start)."""
        return self.supervisor.state if self.supervisor is not None else None

    def status(self) -> EngineStatus:
        state = self.bridge_state()
        if state is None:
            return EngineStatus(self.name, False, "WhatsApp bridge not started", starts=0)
        detail = f"WhatsApp bridge up (pid {state.pid})" if state.up else state.reason
        if state.up and state.last_exit:
            detail += f"; restarted after it {state.last_exit}"
        return EngineStatus(self.name, state.up, detail, starts=state.starts, since=state.since)

    def collectors(self) -> list[Collector]:
        """The bridge's metrics (`broker_bridge_up`, `broker_bridge_starts_total`)."""
        return [BridgeCollector(self.bridge_state)]


def create(options: EngineOptions) -> BaileysEngine:
    s = options.settings
    return BaileysEngine(wa_version=s.wa_version, ws_url=s.baileys_ws_url,
                         connect_timeout_s=s.connect_timeout_s,
                         max_media_bytes=s.max_media_bytes)
