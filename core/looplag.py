"""The event loop's lag: how late a periodic wake-up comes, as a metric and a warning."""

from __future__ import annotations

import asyncio
import logging
import math

from prometheus_client import CollectorRegistry, Gauge, Histogram

logger = logging.getLogger(__name__)

# Wake up four times a second: a stall of a few hundred milliseconds is caught, and the
# monitor itself costs nothing measurable.
TICK_S = 0.25
# Ingest and alerting share the loop with the API: a tenth of a second is already late.
WARN_S = 0.1
# A stall usually repeats (a big export, a slow query): one line per 10 s is enough.
WARN_EVERY_S = 10.0
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    """Measures the loop it runs on. `worst_s`: the longest lag seen so far."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        tick_s: float = TICK_S,
        warn_s: float = WARN_S,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self.tick_s = tick_s
        self.warn_s = warn_s
        self.warn_every_s = warn_every_s
        self.worst_s = 0.0
        self._last_warning = -math.inf
        self._unreported = 0  # stalls past warn_s since the last warning
        self._histogram = Histogram(
            "smartcover_event_loop_lag_seconds",
            "How late the event loop ran a periodic wake-up",
            buckets=_BUCKETS,
            registry=registry,
        )
        self._last = Gauge(
            "smartcover_event_loop_lag_last_seconds",
            "The event loop's most recently measured lag",
            registry=registry,
        )

    async def run(self) -> None:
        """Measures until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            self.observe(now - due, now)

    def observe(self, lag_s: float, now: float) -> None:
        """Records one lag measured at `now` (the loop's clock), warning if it is long."""
        lag_s = max(lag_s, 0.0)
        self._histogram.observe(lag_s)
        self._last.set(lag_s)
        self.worst_s = max(self.worst_s, lag_s)
        if lag_s < self.warn_s:
            return
        if now - self._last_warning < self.warn_every_s:
            self._unreported += 1
            return
        logger.warning(
            "event loop stalled for %.0f ms (work that should run in a thread or in"
            " pieces); %d more stalls past %.0f ms since the last warning",
            lag_s * 1000,
            self._unreported,
            self.warn_s * 1000,
        )
        self._last_warning = now
        self._unreported = 0
