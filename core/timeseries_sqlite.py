"""The embedded time-series store: `cover_reading` in a SQLite file, when no InfluxDB is set.

It takes the same encoded points as InfluxDB (line protocol, so the spool holds one
format whatever the store) and keeps InfluxDB's rule that a point written again with
the same series and time replaces the old one. For demos, tests and a single small
pilot; InfluxDB is the production store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.contract import Reading
from core.timeseries import MEASUREMENT, StoreRejected, StoreUnavailable, line_of

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
"""
_INSERT = (
    "INSERT OR REPLACE INTO cover_reading (device_id, ts_ms, cover_id, tilt_deg,"
    " displacement_mm, water_level_cm, battery_v, rssi_dbm, temperature_c, seq)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PREFIX = MEASUREMENT.encode() + b","


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

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
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

    async def close(self) -> None:
        with self._lock:
            self._db.close()
