"""The bridge's state as Prometheus series, computed at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.engines.baileys.supervisor import BridgeState


class BridgeCollector(Collector):
    """`broker_bridge_up` (1 while the bridge listens) and `broker_bridge_starts_total`."""

    def __init__(self, state: Callable[[], BridgeState | None]) -> None:
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return []  # computed series: skip the registration-time collect

    def collect(self) -> Iterable[Metric]:
        state = self._state() or BridgeState()
        yield GaugeMetricFamily("broker_bridge_up",
                                "1 while the WhatsApp bridge (Baileys engine) is up, else 0.",
                                value=1 if state.up else 0)
        yield CounterMetricFamily("broker_bridge_starts",
                                  "Times the WhatsApp bridge was started (restarts included).",
                                  value=state.starts)
