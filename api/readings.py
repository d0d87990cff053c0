"""Readings of one cover over a window, raw or downsampled, behind the `ReadingQuery` seam.

The HTTP layer only parses and bounds the window; a `ReadingQuery` answers it. InfluxDB
answers with InfluxQL whose every value (cover, times, bucket width, limit) is a bound
parameter, so no text from a request ever becomes query text. The embedded store
implements the same protocol.

Raw readings are kept for the retention period only (`core.retention`); buckets of whole
hours that start before that horizon are answered from the hourly aggregates, kept
forever, and the rest from the raw readings (`split_at_horizon`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import BaseModel

from api.errors import BadRequest
from core.clock import wall_clock_ms
from core.timeseries import (
    HOURLY_MEASUREMENT,
    HOURLY_POLICY,
    MEASUREMENT,
    InfluxStore,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

FIELDS = ("tilt_deg", "displacement_mm", "water_level_cm", "battery_v", "rssi_dbm", "temperature_c")
DEFAULT_SPAN = timedelta(hours=24)
# Raw points are for zooming in: a week of a sensor reporting every minute is ~10 000.
MAX_RAW_SPAN = timedelta(days=7)
MAX_RAW_POINTS = 10_000
# Downsampled series: a quarter, in at most 2 000 buckets (a chart's width and more).
MAX_SPAN = timedelta(days=92)
MAX_BUCKETS = 2_000
_EVERY = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
MAX_EVERY_S = 86_400
# What parse_every accepts (up to MAX_EVERY_S), as the schema states it: 1-86400 s,
# 1-1440 m, 1-24 h or 1 d.
EVERY_PATTERN = (
    r"^(?:(?:[1-9][0-9]{0,3}|[1-7][0-9]{4}|8[0-5][0-9]{3}|86[0-3][0-9]{2}|86400)s"
    r"|(?:[1-9][0-9]{0,2}|1[0-3][0-9]{2}|14[0-3][0-9]|1440)m|(?:[1-9]|1[0-9]|2[0-4])h|1d)$"
)
# Times InfluxDB can store (64-bit nanoseconds), with a margin; and no sensor is older.
EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
_NS_PER_MS = 1_000_000
HOUR_MS = 3_600_000


class FieldValues(BaseModel):
    tilt_deg: float | None = None
    displacement_mm: float | None = None
    water_level_cm: float | None = None
    battery_v: float | None = None
    rssi_dbm: float | None = None
    temperature_c: float | None = None


class ReadingPoint(FieldValues):
    """One reading as stored (device time, epoch ms)."""

    time_ms: int
    device_id: str | None = None
    seq: int | None = None


class ReadingBucket(BaseModel):
    """Readings in [time_ms, time_ms + every): how many, the mean and the max per field.

    A bucket answered from hourly aggregates (older than the raw retention) counts whole
    hours, and its mean is the mean of the hourly means (each hour weighs the same)."""

    time_ms: int
    readings: int
    mean: FieldValues
    max: FieldValues


class ReadingSeries(BaseModel):
    cover_id: str
    start: datetime
    end: datetime
    every_s: int | None
    points: list[ReadingPoint]
    buckets: list[ReadingBucket]
    truncated: bool  # raw points beyond MAX_RAW_POINTS were left out


@dataclass(frozen=True, slots=True)
class ReadingWindow:
    """A cover and a half-open time range [start_ms, end_ms), epoch ms."""

    cover_id: str
    start_ms: int
    end_ms: int


class ReadingQuery(Protocol):
    """What the readings endpoint needs of a time-series store.

    `points` returns at most `limit` readings of the window, oldest first. `buckets`
    returns the non-empty buckets of `every_s` seconds (aligned on multiples of `every_s`
    since the epoch, as InfluxDB's GROUP BY time does), oldest first. Both raise
    `core.timeseries.TimeSeriesError` when the store cannot answer.
    """

    async def points(self, window: ReadingWindow, *, limit: int) -> list[ReadingPoint]: ...

    async def buckets(self, window: ReadingWindow, *, every_s: int) -> list[ReadingBucket]: ...


def parse_every(every: str) -> int:
    """`30s`, `5m`, `1h`, `1d` → seconds; a 400 naming the accepted form otherwise."""
    match = _EVERY.match(every)
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not match or seconds > MAX_EVERY_S:
        raise BadRequest(
            f"every={every[:20]!r}: give a whole number and a unit, s, m, h or d (e.g. 5m),"
            " at most 1d",
            code="bad_every",
        )
    return seconds


def require_zone(**moments: datetime | None) -> None:
    """400 for a time without a time zone: 08:00 would be ambiguous (UTC or Beijing?)."""
    for name, value in moments.items():
        if value is not None and value.tzinfo is None:
            raise BadRequest(f"{name}: give a time zone (Z or +08:00)", code="bad_range")


def check_window(start: datetime, end: datetime, every_s: int | None) -> None:
    """400 for a window that is empty, too long, or cut in too many buckets."""
    require_zone(start=start, end=end)
    for name, value in (("start", start), ("end", end)):
        if not EARLIEST <= value < LATEST:
            raise BadRequest(f"{name}: outside {EARLIEST:%Y}-{LATEST:%Y}", code="bad_range")
    if end <= start:
        raise BadRequest("end must be after start", code="bad_range")
    span = end - start
    if every_s is None and span > MAX_RAW_SPAN:
        raise BadRequest(
            f"raw readings cover at most {MAX_RAW_SPAN.days} days: shorten the range or give"
            " `every` to downsample",
            code="range_too_long",
        )
    if span > MAX_SPAN:
        raise BadRequest(f"the range is at most {MAX_SPAN.days} days", code="range_too_long")
    if every_s is not None and math.ceil(span.total_seconds() / every_s) > MAX_BUCKETS:
        raise BadRequest(
            f"{math.ceil(span.total_seconds() / every_s)} buckets: at most {MAX_BUCKETS};"
            " give a larger `every` or a shorter range",
            code="too_many_buckets",
        )


def split_at_horizon(
    window: ReadingWindow, every_s: int, horizon_ms: int
) -> tuple[ReadingWindow | None, ReadingWindow | None]:
    """The part of the window answered from hourly aggregates, and the part from raw
    readings. Aggregates serve whole-hour buckets that start before the raw horizon, so
    no bucket mixes the two; sub-hour buckets come from raw readings only (older ones
    are gone: the answer has no buckets there)."""
    every_ms = every_s * 1000
    if every_ms % HOUR_MS:
        return None, window
    cut = -(-horizon_ms // every_ms) * every_ms  # the first bucket start at or after it
    if window.start_ms >= cut:
        return None, window
    if window.end_ms <= cut:
        return window, None
    old = ReadingWindow(window.cover_id, window.start_ms, cut)
    return old, ReadingWindow(window.cover_id, cut, window.end_ms)


def whole_hours(window: ReadingWindow) -> ReadingWindow:
    """The window from the start of its first hour: aggregates are stamped on the hour."""
    return ReadingWindow(
        window.cover_id, window.start_ms - window.start_ms % HOUR_MS, window.end_ms
    )


# Buckets of one part of a window: from the hourly aggregates (True) or raw readings.
BucketSource = Callable[[bool, ReadingWindow], Awaitable[list["ReadingBucket"]]]


async def buckets_across_horizon(
    window: ReadingWindow, every_s: int, horizon_ms: int, source: BucketSource
) -> list[ReadingBucket]:
    """The window's buckets, those before the raw horizon from the hourly aggregates."""
    old, recent = split_at_horizon(window, every_s, horizon_ms)
    found = []
    if old is not None:
        found += await source(True, whole_hours(old))
    if recent is not None:
        found += await source(False, recent)
    return found


# -- InfluxDB ---------------------------------------------------------------------------

_RAW = (
    f"SELECT device_id, {', '.join(FIELDS)}, seq FROM {MEASUREMENT}"  # noqa: S608 -- constants
    " WHERE cover_id = $cover_id AND time >= $start AND time < $end"
    " ORDER BY time ASC LIMIT $limit"
)
_AGGREGATES = ", ".join(f"mean({f}) AS {f}_mean, max({f}) AS {f}_max" for f in FIELDS)
_BUCKETS = (
    f"SELECT count(seq) AS readings, {_AGGREGATES} FROM {MEASUREMENT}"  # noqa: S608 -- constants
    " WHERE cover_id = $cover_id AND time >= $start AND time < $end"
    " GROUP BY time($every) fill(none)"
)
_HOURLY_AGGREGATES = ", ".join(
    f"mean({f}_mean) AS {f}_mean, max({f}_max) AS {f}_max" for f in FIELDS
)
_HOURLY_BUCKETS = (
    f"SELECT sum(readings) AS readings, {_HOURLY_AGGREGATES}"  # noqa: S608 -- constants
    f' FROM "{HOURLY_POLICY}".{HOURLY_MEASUREMENT}'
    " WHERE cover_id = $cover_id AND time >= $start AND time < $end"
    " GROUP BY time($every) fill(none)"
)
# Answers that mean "nothing stored yet" rather than a failure.
_NOTHING_YET = ("database not found", "retention policy not found")


def _rows(answer: Any) -> list[dict[str, Any]]:
    """The rows of the first statement's series, as {column: value}."""
    result = (answer.get("results") or [{}])[0]
    error = result.get("error")
    if error:
        if str(error).startswith(_NOTHING_YET):
            logger.warning("InfluxDB: %s (nothing written or set up yet?)", error)
            return []
        raise StoreUnavailable(f"InfluxDB refused the query: {str(error)[:200]}")
    return [
        dict(zip(series["columns"], row, strict=True))
        for series in result.get("series", [])
        for row in series["values"]
    ]


class InfluxReadingQuery:
    """`ReadingQuery` on InfluxDB 1.x (or the v1 API of 2.x/3.x) through `InfluxStore`."""

    def __init__(self, store: InfluxStore, *, clock_ms: Callable[[], int] = wall_clock_ms) -> None:
        self._store = store
        self._clock_ms = clock_ms

    @staticmethod
    def _params(window: ReadingWindow) -> dict[str, Any]:
        # Integers bind as nanosecond timestamps in InfluxQL.
        return {
            "cover_id": window.cover_id,
            "start": window.start_ms * _NS_PER_MS,
            "end": window.end_ms * _NS_PER_MS,
        }

    async def points(self, window: ReadingWindow, *, limit: int) -> list[ReadingPoint]:
        params = {**self._params(window), "limit": limit}
        answer = await self._store.query(_RAW, params=params)
        return [
            ReadingPoint(
                time_ms=row["time"],
                device_id=row.get("device_id"),
                seq=row.get("seq"),
                **{name: row.get(name) for name in FIELDS},
            )
            for row in _rows(answer)
        ]

    async def buckets(self, window: ReadingWindow, *, every_s: int) -> list[ReadingBucket]:
        async def source(hourly: bool, part: ReadingWindow) -> list[ReadingBucket]:
            return await self._buckets(_HOURLY_BUCKETS if hourly else _BUCKETS, part, every_s)

        horizon = self._clock_ms() - self._store.raw_retention_ms
        return await buckets_across_horizon(window, every_s, horizon, source)

    async def _buckets(
        self, query: str, window: ReadingWindow, every_s: int
    ) -> list[ReadingBucket]:
        # A typed parameter: InfluxQL's GROUP BY time() takes only a duration literal.
        params = {**self._params(window), "every": {"duration": f"{every_s}s"}}
        answer = await self._store.query(query, params=params)
        return [
            ReadingBucket(
                time_ms=row["time"],
                readings=row.get("readings") or 0,
                mean=FieldValues(**{name: row.get(f"{name}_mean") for name in FIELDS}),
                max=FieldValues(**{name: row.get(f"{name}_max") for name in FIELDS}),
            )
            for row in _rows(answer)
        ]
