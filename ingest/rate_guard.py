"""The per-device reading-rate guard: a flooding device's excess is dead-lettered."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from core.contract import Reading, Reason
from core.deadletters import DeadLetter
from core.rates import RateTable
from core.settings import Settings

# Devices remembered per generation of the rate table (two generations at most): about
# 200 bytes each, so the table stays under 20 MB whatever the fleet or a flood of ids.
MAX_DEVICES = 50_000
# Longer topic segments are not device ids (DESIGN §3): the decoder dead-letters them,
# and they must not become keys of the table.
_MAX_DEVICE_ID = 64
# Only live messages count: those with a reading taken within this window of its arrival
# (or none that decoded). A backlog the broker delivers after an outage (a week of a
# sensor's readings at once) comes at the broker's pace, not the device's: it is stored.
LIVE_WINDOW_MS = 10 * 60 * 1000


class DeviceRateGuard:
    """Admits each device's telemetry messages up to a sustained rate, with bursts.

    Messages are counted, not readings: a batch of 100 buffered readings is one message,
    as an NB-IoT sensor sends it. Only live messages count (LIVE_WINDOW_MS): a backlog
    after an outage is stored whatever its size. A sensor reports every few minutes, every
    few seconds in an alarm; the default of 10 messages a second after a burst of 600 is
    far above that.
    """

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table: RateTable | None = None
        if rate_per_s > 0:
            self._table = RateTable(
                rate_per_s=rate_per_s, burst=burst, max_keys=MAX_DEVICES, clock=clock
            )
        self._detail = f"over {rate_per_s:g} messages/s after a burst of {burst}"

    @classmethod
    def from_settings(cls, settings: Settings) -> DeviceRateGuard:
        return cls(rate_per_s=settings.device_rate_per_s, burst=settings.device_rate_burst)

    @property
    def devices(self) -> int:
        """Devices remembered now (for tests and the curious)."""
        return 0 if self._table is None else len(self._table)

    def admit(self, device_id: str, readings: Sequence[Reading], now_ms: int) -> bool:
        """Whether this message of `device_id`, decoded into `readings`, is within its
        rate (a live one is then counted)."""
        if self._table is None or len(device_id) > _MAX_DEVICE_ID:
            return True
        live_since = now_ms - LIVE_WINDOW_MS
        if readings and all(reading.ts_ms < live_since for reading in readings):
            return True  # a backlog
        return self._table.admit(device_id) == 0.0

    def letter(self, *, at_ms: int, topic: str, payload: bytes) -> DeadLetter:
        """The dead letter of a message refused by `admit`."""
        return DeadLetter.of(
            at_ms=at_ms,
            topic=topic,
            reason=Reason.RATE_LIMITED,
            detail=self._detail,
            payload=payload,
        )
