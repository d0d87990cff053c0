"""`ReadingQuery` on the embedded SQLite time-series store (when no InfluxDB is set)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.readings import (
    FieldValues,
    ReadingBucket,
    ReadingPoint,
    ReadingQuery,
    ReadingWindow,
    buckets_across_horizon,
)
from core.clock import wall_clock_ms
from core.timeseries_sqlite import FIELDS, SqliteReadingStore

_RAW = (
    "SELECT ts_ms, device_id, seq, tilt_deg, displacement_mm, water_level_cm, battery_v,"
    " rssi_dbm, temperature_c FROM cover_reading WHERE cover_id = ? AND ts_ms >= ?"
    " AND ts_ms < ? ORDER BY ts_ms LIMIT ?"
)
# Buckets aligned on multiples of the width since the epoch, as InfluxDB's GROUP BY time.
_BUCKETS = (
    "SELECT (ts_ms / ?) * ? AS bucket, count(*),"
    " avg(tilt_deg), avg(displacement_mm), avg(water_level_cm), avg(battery_v),"
    " avg(rssi_dbm), avg(temperature_c),"
    " max(tilt_deg), max(displacement_mm), max(water_level_cm), max(battery_v),"
    " max(rssi_dbm), max(temperature_c)"
    " FROM cover_reading WHERE cover_id = ? AND ts_ms >= ? AND ts_ms < ?"
    " GROUP BY bucket ORDER BY bucket"
)
# The same buckets from the hourly aggregates (older than the raw retention).
_HOURLY_BUCKETS = (
    "SELECT (hour_ms / ?) * ? AS bucket, sum(readings), "  # noqa: S608 -- constants
    + ", ".join(f"avg({f}_mean)" for f in FIELDS)
    + ", "
    + ", ".join(f"max({f}_max)" for f in FIELDS)
    + " FROM cover_reading_hourly WHERE cover_id = ? AND hour_ms >= ? AND hour_ms < ?"
    " GROUP BY bucket ORDER BY bucket"
)


def _values(row: tuple[Any, ...]) -> FieldValues:
    return FieldValues(**dict(zip(FIELDS, row, strict=True)))


class SqliteReadingQuery:
    def __init__(
        self, store: SqliteReadingStore, *, clock_ms: Callable[[], int] = wall_clock_ms
    ) -> None:
        self._store = store
        self._clock_ms = clock_ms

    async def points(self, window: ReadingWindow, *, limit: int) -> list[ReadingPoint]:
        rows = await self._store.query(
            _RAW, (window.cover_id, window.start_ms, window.end_ms, limit)
        )
        return [
            ReadingPoint(
                time_ms=row[0],
                device_id=row[1],
                seq=row[2],
                **dict(zip(FIELDS, row[3:], strict=True)),
            )
            for row in rows
        ]

    async def buckets(self, window: ReadingWindow, *, every_s: int) -> list[ReadingBucket]:
        async def source(hourly: bool, part: ReadingWindow) -> list[ReadingBucket]:
            return await self._buckets(_HOURLY_BUCKETS if hourly else _BUCKETS, part, every_s)

        horizon = self._clock_ms() - self._store.raw_retention_ms
        return await buckets_across_horizon(window, every_s, horizon, source)

    async def _buckets(self, sql: str, window: ReadingWindow, every_s: int) -> list[ReadingBucket]:
        width = every_s * 1000
        rows = await self._store.query(
            sql, (width, width, window.cover_id, window.start_ms, window.end_ms)
        )
        return [
            ReadingBucket(
                time_ms=row[0], readings=row[1], mean=_values(row[2:8]), max=_values(row[8:14])
            )
            for row in rows
        ]


def _conforms(query: SqliteReadingQuery) -> ReadingQuery:
    return query  # mypy checks here that the class meets the protocol
