"""The embedded time-series store: `cover_reading` in a SQLite file, when no InfluxDB is set.

It takes the same encoded points as InfluxDB (line protocol, so the spool holds one
format whatever the store) and keeps InfluxDB's rule that a point written again with
the same series and time replaces the old one. For demos, tests and a single small
pilot; InfluxDB is the production store.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.contract import Reading
from core.timeseries import DAY_MS, MEASUREMENT, StoreRejected, StoreUnavailable, line_of

FIELDS = ("tilt_deg", "displacement_mm", "water_level_cm", "battery_v", "rssi_dbm", "temperature_c")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS cover_reading (
    device_id TEXT NOT NULL,
    ts_ms INTEGER NOT NULL,
    cover_id TEXT,
    {", ".join(f"{name} REAL" for name in FIELDS)},
    seq INTEGER NOT NULL,
    PRIMARY KEY (device_id, ts_ms)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cover_reading_cover ON cover_reading (cover_id, ts_ms);
-- Pruning walks the oldest hours of every device.
CREATE INDEX IF NOT EXISTS cover_reading_time ON cover_reading (ts_ms);
-- Hourly aggregates, kept forever; cover_id '' for a device bound to no cover.
CREATE TABLE IF NOT EXISTS cover_reading_hourly (
    device_id TEXT NOT NULL,
    hour_ms INTEGER NOT NULL,
    cover_id TEXT NOT NULL,
    readings INTEGER NOT NULL,
    {", ".join(f"{name}_mean REAL, {name}_max REAL, {name}_last REAL" for name in FIELDS)},
    PRIMARY KEY (device_id, hour_ms, cover_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cover_reading_hourly_cover
    ON cover_reading_hourly (cover_id, hour_ms);
CREATE INDEX IF NOT EXISTS cover_reading_hourly_time ON cover_reading_hourly (hour_ms);
CREATE TABLE IF NOT EXISTS retention_state (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
_INSERT = (
    "INSERT OR REPLACE INTO cover_reading (device_id, ts_ms, cover_id, tilt_deg,"
    " displacement_mm, water_level_cm, battery_v, rssi_dbm, temperature_c, seq)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PREFIX = MEASUREMENT.encode() + b","
HOUR_MS = 3_600_000
# The last non-null value of a field in the hour, as InfluxDB's last() gives it.
_LAST = (
    "(SELECT r.{f} FROM cover_reading r WHERE r.device_id = g.device_id"
    " AND r.ts_ms >= g.hour_ms AND r.ts_ms < g.hour_ms + 3600000"
    " AND coalesce(r.cover_id, '') = g.cover_id AND r.{f} IS NOT NULL"
    " ORDER BY r.ts_ms DESC LIMIT 1)"
)
_AGGREGATE = f"""
INSERT OR REPLACE INTO cover_reading_hourly
SELECT g.device_id, g.hour_ms, g.cover_id, g.readings,
    {", ".join(f"g.{f}_mean, g.{f}_max, {_LAST.format(f=f)}" for f in FIELDS)}
FROM (
    SELECT device_id, (ts_ms / 3600000) * 3600000 AS hour_ms, coalesce(cover_id, '') AS cover_id,
        count(*) AS readings,
        {", ".join(f"avg({f}) AS {f}_mean, max({f}) AS {f}_max" for f in FIELDS)}
    FROM cover_reading WHERE ts_ms >= ? AND ts_ms < ?
    GROUP BY device_id, hour_ms, coalesce(cover_id, '')
) AS g
"""  # noqa: S608 -- built from constants only
_AGGREGATED_THROUGH = "aggregated_through_ms"
_DELETE_SOME = (
    "DELETE FROM cover_reading WHERE (device_id, ts_ms) IN (SELECT device_id, ts_ms"
    " FROM cover_reading WHERE ts_ms >= ? AND ts_ms < ? LIMIT ?)"
)


def _unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ")


def parse_point(line: bytes) -> tuple[Any, ...]:
    """One of our own `cover_reading` lines back into a row; StoreRejected if it is not."""
    try:
        text = line.decode()
        if not line.startswith(_PREFIX):
            raise ValueError("not a cover_reading point")
        series, field_set, stamp = text.rsplit(" ", 2)
        tags = dict(part.split("=", 1) for part in series.split(",")[1:])
        values = dict(part.split("=", 1) for part in field_set.split(","))
        row: list[Any] = [_unescape(tags["device_id"]), int(stamp), tags.get("cover_id")]
        row += [float(values[name]) if name in values else None for name in FIELDS]
        row.append(int(values["seq"].removesuffix("i")))
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise StoreRejected(f"unparsable point: {exc}") from None
    return tuple(row)


class SqliteReadingStore:
    """A `ReadingStore` in one SQLite file; all file work runs in a worker thread."""

    def __init__(self, path: Path, *, raw_retention_days: int = 400) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self.raw_retention_ms = raw_retention_days * DAY_MS
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a 204 from us means on disk
        self._db.executescript(_SCHEMA)

    def encode(self, readings: Sequence[Reading], cover_ids: Sequence[str | None]) -> list[bytes]:
        return [line_of(r, c) for r, c in zip(readings, cover_ids, strict=True)]

    async def write(self, points: Sequence[bytes]) -> None:
        rows = [parse_point(point) for point in points]
        await asyncio.to_thread(self._insert, rows)

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(_INSERT, rows)
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreUnavailable(f"embedded store: {exc}") from exc

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read-only SQL over `cover_reading`, for the readings API and tests."""
        return await asyncio.to_thread(self._select, sql, tuple(params))

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"embedded store: {exc}") from exc

    async def ping(self) -> None:
        await self.query("SELECT 1")

    async def aggregate_hours(self, *, until_ms: int, max_hours: int) -> int:
        """Aggregates the next hours not yet aggregated, before `until_ms` and at most
        `max_hours` of them, in one short transaction; returns how many hours it did."""
        return await asyncio.to_thread(self._aggregate_next, until_ms, max_hours)

    def _aggregate_next(self, until_ms: int, max_hours: int) -> int:
        with self._lock, self._transaction():
            start = self._aggregated_through()
            if start is None or start >= until_ms:
                return 0
            last = until_ms - until_ms % HOUR_MS
            end = min(last, start + max_hours * HOUR_MS)
            if end <= start:
                return 0
            if self._db.execute(_AGGREGATE, (start, end)).rowcount == 0:
                end = self._next_hour_stored(end, last)  # a quiet stretch: skip it at once
            self._db.execute(
                "INSERT OR REPLACE INTO retention_state VALUES (?, ?)", (_AGGREGATED_THROUGH, end)
            )
            return (end - start) // HOUR_MS

    def _next_hour_stored(self, after_ms: int, last_ms: int) -> int:
        """The hour of the first reading at or after `after_ms`, at most `last_ms`."""
        found = self._db.execute(
            "SELECT min(ts_ms) FROM cover_reading WHERE ts_ms >= ?", (after_ms,)
        ).fetchone()[0]
        if found is None:
            return last_ms
        return max(after_ms, min(last_ms, int(found) - int(found) % HOUR_MS))

    def _aggregated_through(self) -> int | None:
        """Where aggregation goes on: the saved mark, else the hour of the oldest reading."""
        row = self._db.execute(
            "SELECT value FROM retention_state WHERE name = ?", (_AGGREGATED_THROUGH,)
        ).fetchone()
        if row is not None:
            return int(row[0])
        oldest = self._db.execute("SELECT min(ts_ms) FROM cover_reading").fetchone()[0]
        return None if oldest is None else int(oldest) - int(oldest) % HOUR_MS

    async def prune(self, *, before_ms: int, max_rows: int) -> int:
        """Deletes up to `max_rows` raw readings of the oldest hour that ends by
        `before_ms`, once that hour's aggregates count them all (a reading stored late
        is aggregated first); returns the rows deleted, 0 when nothing is that old."""
        return await asyncio.to_thread(self._prune_oldest_hour, before_ms, max_rows)

    def _prune_oldest_hour(self, before_ms: int, max_rows: int) -> int:
        with self._lock, self._transaction():
            oldest = self._db.execute("SELECT min(ts_ms) FROM cover_reading").fetchone()[0]
            if oldest is None:
                return 0
            hour = int(oldest) - int(oldest) % HOUR_MS
            if hour + HOUR_MS > before_ms:
                return 0
            if not self._aggregates_complete(hour):
                self._db.execute(_AGGREGATE, (hour, hour + HOUR_MS))
            deleted = self._db.execute(_DELETE_SOME, (hour, hour + HOUR_MS, max_rows)).rowcount
            return int(deleted)

    def _aggregates_complete(self, hour: int) -> bool:
        """Whether the hour's aggregates count every reading it holds: none came late.
        Fewer readings than counted: part of the hour is pruned already."""
        stored = self._db.execute(
            "SELECT count(*) FROM cover_reading WHERE ts_ms >= ? AND ts_ms < ?",
            (hour, hour + HOUR_MS),
        ).fetchone()[0]
        counted = self._db.execute(
            "SELECT coalesce(sum(readings), 0) FROM cover_reading_hourly WHERE hour_ms = ?",
            (hour,),
        ).fetchone()[0]
        return bool(stored <= counted)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, rolled back on any error; SQLite's errors translated."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"embedded store: {exc}") from exc

    async def close(self) -> None:
        with self._lock:
            self._db.close()
