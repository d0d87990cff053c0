"""`smartcover retention`: applies the time-series retention once, now, and says what it did.

The service does the same by itself at every start. This command is for an InfluxDB
whose service user may not manage retention: run it once with an admin user, and the
service afterwards finds everything in place.
"""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from core import logs, retention_influx
from core.clock import wall_clock_ms
from core.retention import backfill_influx, maintain_sqlite
from core.timeseries import (
    DAY_MS,
    HOURLY_POLICY,
    InfluxStore,
    ReadingStore,
    StoreAuthFailed,
    TimeSeriesError,
)
from core.timeseries_sqlite import SqliteReadingStore
from ingest.bootstrap import build_store
from smartcover.cli_settings import load_settings

console = Console()


def retention_command() -> None:
    """Sets the time-series retention up now (SMARTCOVER_RETENTION_RAW_DAYS).

    On InfluxDB: the raw policy, the `forever` policy and the hourly continuous query,
    then the first aggregation of what is stored; it needs an admin user (e.g.
    SMARTCOVER_INFLUX_USER=admin SMARTCOVER_INFLUX_PASSWORD=… smartcover retention).
    On the embedded store: aggregates and prunes whatever is due.
    """
    settings = load_settings()
    logs.configure(settings.log_level)
    if not asyncio.run(_apply(build_store(settings))):
        raise typer.Exit(1)


async def _apply(store: ReadingStore) -> bool:
    try:
        if isinstance(store, InfluxStore):
            return await _apply_influx(store)
        if isinstance(store, SqliteReadingStore):
            return await _apply_embedded(store)
        console.print(f"No retention for a {type(store).__name__}.")
        return True
    finally:
        await store.close()


async def _apply_influx(store: InfluxStore) -> bool:
    try:
        outcome = await retention_influx.apply(store)
    except (retention_influx.RetentionNotPermitted, StoreAuthFailed) as exc:
        console.print(f"[red]Not permitted:[/red] {exc}\nRun this with an InfluxDB admin user.")
        return False
    except TimeSeriesError as exc:
        console.print(f"[red]Retention not set up:[/red] {exc}")
        return False
    days = store.config.raw_retention_days
    console.print(f"InfluxDB {store.database!r}: raw readings ({outcome.raw_policy}) kept {days}")
    console.print(f"days, hourly aggregates ({HOURLY_POLICY}) kept forever.")
    for change in outcome.changed or ("nothing to change",):
        console.print(f"  {change}")
    if outcome.cq_created:
        written = await backfill_influx(store, wall_clock_ms())
        console.print(f"  aggregated the readings already stored: {written} hourly points")
    return True


async def _apply_embedded(store: SqliteReadingStore) -> bool:
    hours = pruned = 0
    now = wall_clock_ms()
    while not (step := await maintain_sqlite(store, now)).idle:
        hours += step.hours_aggregated
        pruned += step.readings_pruned
    days = store.raw_retention_ms // DAY_MS
    console.print(
        f"Embedded store: {hours} hours aggregated, {pruned} readings older than"
        f" {days} days pruned."
    )
    return True
