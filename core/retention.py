"""Keeps the time series within its retention: set up on start, then maintained.

On InfluxDB the server drops expired readings itself and a continuous query makes the
hourly aggregates (`core.retention_influx`); this job sets that up, fills in the hours
stored before it existed, and aggregates each day again once late readings can no longer
arrive. The embedded store has neither, so this job aggregates its hours and prunes its
expired readings, one hour per short transaction in the store's worker thread: writes
get the file between two steps and the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from core import retention_influx
from core.clock import wall_clock_ms
from core.retention_influx import SETTLE_MS, RetentionNotPermitted, SetupOutcome
from core.timeseries import DAY_MS, InfluxStore, ReadingStore, StoreAuthFailed, TimeSeriesError
from core.timeseries_sqlite import SqliteReadingStore

logger = logging.getLogger(__name__)

# Work done, the job waits this long for more: an hour's readings expire once an hour.
_IDLE_S = 300.0
# Between two steps of a backlog (a first start on a year of data): writes go first.
_STEP_PAUSE_S = 0.05
# A store that does not answer at start-up is asked again this often.
_RETRY_S = 30.0
# Work per transaction in the embedded store: an hour of 2,000 sensors reporting each
# minute is aggregated in ~0.4 s; 5,000 readings are deleted in well under that.
_HOURS_PER_STEP = 1
_PRUNE_ROWS = 5000


class RetentionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied = Gauge(
            "smartcover_retention_applied",
            "1 when the time-series retention is set up, 0 when it could not be",
            registry=registry,
        )
        self.pruned = Counter(
            "smartcover_retention_pruned_readings",
            "Raw readings deleted from the embedded store past the retention period",
            registry=registry,
        )


@dataclass(slots=True)
class MaintenanceStep:
    """What one pass over the embedded store did."""

    hours_aggregated: int = 0
    readings_pruned: int = 0

    @property
    def idle(self) -> bool:
        return self.hours_aggregated == 0 and self.readings_pruned == 0


async def keep_retention(
    store: ReadingStore,
    registry: CollectorRegistry,
    *,
    clock_ms: Callable[[], int] = wall_clock_ms,
) -> None:
    """Runs until cancelled; a store that refuses the set-up is logged, never fatal."""
    metrics = RetentionMetrics(registry)
    if isinstance(store, InfluxStore):
        await _keep_influx(store, metrics, clock_ms)
    elif isinstance(store, SqliteReadingStore):
        metrics.applied.set(1)
        await _keep_sqlite(store, metrics, clock_ms)
    else:
        logger.info("retention: nothing to do for a %s", type(store).__name__)


# -- InfluxDB ---------------------------------------------------------------------------


async def set_up_influx(store: InfluxStore, metrics: RetentionMetrics) -> SetupOutcome | None:
    """Applies the policies and the continuous query, waiting for a store that is down;
    None when InfluxDB will not let us (logged, and the gauge says so)."""
    while True:
        try:
            outcome = await retention_influx.apply(store)
        except (RetentionNotPermitted, StoreAuthFailed) as exc:
            _refused(store, metrics, f"the user may not manage the database ({exc})")
            return None
        except TimeSeriesError as exc:
            if not exc.retryable:
                _refused(store, metrics, str(exc))
                return None
            logger.warning("retention set-up waits for InfluxDB: %s", exc)
            await asyncio.sleep(_RETRY_S)
            continue
        metrics.applied.set(1)
        days = store.config.raw_retention_days
        done = "; ".join(outcome.changed) or "already in place"
        logger.info("retention on InfluxDB: raw %d days, hourly forever: %s", days, done)
        return outcome


def _refused(store: InfluxStore, metrics: RetentionMetrics, why: str) -> None:
    metrics.applied.set(0)
    logger.error(
        "retention NOT set up on InfluxDB database %r: %s. Readings are still stored, but"
        " kept as its default policy says and no hourly aggregates are made. Start the"
        " service once with an admin user, or have an admin set it up (README, Retention).",
        store.database,
        why,
    )


async def backfill_influx(store: InfluxStore, now_ms: int) -> int:
    """Aggregates the hours stored before the continuous query existed, newest day first,
    back to the oldest reading kept; returns the points written."""
    written = 0
    day_end = now_ms
    oldest = await retention_influx.oldest_ms(store, now_ms - store.raw_retention_ms)
    while oldest is not None and day_end > oldest:
        written += await retention_influx.aggregate_range(store, day_end - DAY_MS, day_end)
        day_end -= DAY_MS
        await asyncio.sleep(_STEP_PAUSE_S)
    return written


def settle_day(now_ms: int) -> int:
    """Start of the UTC day that has just passed the stale limit: aggregated once more."""
    moment = now_ms - SETTLE_MS
    return moment - moment % DAY_MS


async def _keep_influx(
    store: InfluxStore, metrics: RetentionMetrics, clock_ms: Callable[[], int]
) -> None:
    outcome = await set_up_influx(store, metrics)
    if outcome is None:
        return
    if outcome.cq_created:
        written = await _logged(backfill_influx(store, clock_ms()), "first")
        if written is not None:
            logger.info("retention: aggregated the readings already stored (%d points)", written)
    settled: int | None = None
    while True:
        day = settle_day(clock_ms())
        if day != settled:
            await _logged(retention_influx.aggregate_range(store, day, day + DAY_MS), "daily")
            settled = day
        await asyncio.sleep(_IDLE_S)


async def _logged(work: Awaitable[int], what: str) -> int | None:
    try:
        return await work
    except TimeSeriesError as exc:
        logger.warning("retention: %s aggregation failed: %s", what, exc)
        return None


# -- the embedded store -----------------------------------------------------------------


async def maintain_sqlite(store: SqliteReadingStore, now_ms: int) -> MaintenanceStep:
    """One step: aggregate the next settled hour, prune some of the oldest expired one."""
    step = MaintenanceStep()
    step.hours_aggregated = await store.aggregate_hours(
        until_ms=now_ms - SETTLE_MS, max_hours=_HOURS_PER_STEP
    )
    step.readings_pruned = await store.prune(
        before_ms=now_ms - store.raw_retention_ms, max_rows=_PRUNE_ROWS
    )
    return step


async def _keep_sqlite(
    store: SqliteReadingStore, metrics: RetentionMetrics, clock_ms: Callable[[], int]
) -> None:
    pruned = 0
    while True:
        try:
            step = await maintain_sqlite(store, clock_ms())
        except TimeSeriesError as exc:
            logger.warning("retention: embedded store maintenance failed: %s", exc)
            await asyncio.sleep(_IDLE_S)
            continue
        metrics.pruned.inc(step.readings_pruned)
        pruned += step.readings_pruned
        if not step.idle:
            await asyncio.sleep(_STEP_PAUSE_S)
            continue
        if pruned:
            days = store.raw_retention_ms // DAY_MS
            logger.info("retention: pruned %d raw readings older than %d days", pruned, days)
            pruned = 0
        await asyncio.sleep(_IDLE_S)
