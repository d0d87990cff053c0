"""Retention on InfluxDB 1.x: raw readings for a period, hourly aggregates forever.

Writes name no retention policy, so raw readings go to the database's default policy
(`autogen` unless an operator chose another); its DURATION is altered in place rather
than a new default created, which would hide the readings already stored from every
query that names no policy. Hourly aggregates go to `forever` (DURATION INF), filled by
a continuous query. A continuous query only ever covers the hours just past, so:
on first set-up the hours already stored are aggregated by `SELECT ... INTO`, a day per
statement; and each day the day that has just passed the 7-day stale limit is
aggregated again, so that readings which arrived late (buffered NB-IoT sensors, a spool
replayed after an outage) are in its aggregates before its raw readings expire.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from core.timeseries import (
    DAY_MS,
    HOURLY_MEASUREMENT,
    HOURLY_POLICY,
    MEASUREMENT,
    InfluxStore,
    StoreRejected,
    StoreUnavailable,
)

logger = logging.getLogger(__name__)

FIELDS = ("tilt_deg", "displacement_mm", "water_level_cm", "battery_v", "rssi_dbm", "temperature_c")
# The version is in the name: a continuous query cannot be altered, only replaced, and
# SHOW gives back a normalised text that is not worth comparing.
CQ_PREFIX = "cover_reading_hourly"
CQ_NAME = f"{CQ_PREFIX}_v1"
# The continuous query recomputes the last two hours each hour: a reading a few minutes
# late still lands in its hour's aggregate. Later ones are caught by the daily pass.
_RESAMPLE_FOR = "2h"
HOUR_MS = 3_600_000
# A day passes the stale limit (7 days, DESIGN §3) plus a margin before it is final.
SETTLE_MS = 8 * DAY_MS
_DURATION_PART = re.compile(r"(\d+)(h|m|s)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1}


def _ident(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def aggregate_select(database: str) -> str:
    """The SELECT of the continuous query (no WHERE: the CQ and callers add the time)."""
    parts = ["count(seq) AS readings"]
    for f in FIELDS:
        parts += [f"mean({f}) AS {f}_mean", f"max({f}) AS {f}_max", f"last({f}) AS {f}_last"]
    db = _ident(database)
    return (
        f"SELECT {', '.join(parts)} INTO {db}.{_ident(HOURLY_POLICY)}.{HOURLY_MEASUREMENT}"  # noqa: S608 -- identifiers quoted
        f" FROM {db}..{MEASUREMENT}"
    )


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    duration_s: int  # 0: kept forever
    default: bool


@dataclass(frozen=True, slots=True)
class SetupOutcome:
    """What the set-up found and did (for the log line and the caller's next steps)."""

    raw_policy: str
    changed: tuple[str, ...]
    cq_created: bool


class RetentionNotPermitted(Exception):
    """The InfluxDB user may write but not manage the database (no admin privilege)."""


def parse_duration(text: str) -> int:
    """InfluxDB's `9600h0m0s` (SHOW RETENTION POLICIES) in seconds; `0s` is infinite."""
    return sum(int(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(text))


def _result(answer: Any) -> dict[str, Any]:
    result: dict[str, Any] = (answer.get("results") or [{}])[0]
    error = result.get("error")
    if error:
        text = str(error)
        if "not authorized" in text or "requires admin" in text:
            raise RetentionNotPermitted(text)
        if text.startswith("database not found"):  # not created yet: the writer alarms
            raise StoreUnavailable(f"InfluxDB: {text[:200]}")
        # Asking again would not help (a 2.x/3.x v1 endpoint without retention DDL, say).
        raise StoreRejected(f"InfluxDB refused a retention statement: {text[:200]}")
    return result


async def _run(store: InfluxStore, statement: str) -> dict[str, Any]:
    return _result(await store.execute(statement))


async def policies(store: InfluxStore) -> list[Policy]:
    result = await _run(store, f"SHOW RETENTION POLICIES ON {_ident(store.database)}")
    return [
        Policy(row["name"], parse_duration(row["duration"]), bool(row["default"]))
        for series in result.get("series", [])
        for row in (dict(zip(series["columns"], v, strict=True)) for v in series["values"])
    ]


async def continuous_queries(store: InfluxStore) -> list[str]:
    """Names of the continuous queries on our database."""
    result = await _run(store, "SHOW CONTINUOUS QUERIES")
    return [
        row[0]
        for series in result.get("series", [])
        if series.get("name") == store.database
        for row in series.get("values") or []
    ]


async def _ensure_raw_policy(store: InfluxStore, found: list[Policy], days: int) -> list[str]:
    raw = next(p for p in found if p.default)
    if raw.duration_s == days * 86_400:
        return []
    await _run(
        store,
        f"ALTER RETENTION POLICY {_ident(raw.name)} ON {_ident(store.database)} DURATION {days}d",
    )
    return [f"raw readings ({raw.name}) kept {days} days"]


async def _ensure_hourly_policy(store: InfluxStore, found: list[Policy]) -> list[str]:
    current = next((p for p in found if p.name == HOURLY_POLICY), None)
    if current is not None and current.duration_s == 0:
        return []
    verb = "CREATE" if current is None else "ALTER"
    tail = " REPLICATION 1" if current is None else ""
    await _run(
        store,
        f"{verb} RETENTION POLICY {_ident(HOURLY_POLICY)} ON {_ident(store.database)}"
        f" DURATION INF{tail}",
    )
    return [f"hourly aggregates ({HOURLY_POLICY}) kept forever"]


async def _ensure_continuous_query(store: InfluxStore) -> bool:
    names = await continuous_queries(store)
    if CQ_NAME in names:
        return False
    db = _ident(store.database)
    for old in (n for n in names if n.startswith(CQ_PREFIX)):
        await _run(store, f"DROP CONTINUOUS QUERY {_ident(old)} ON {db}")
    await _run(
        store,
        f"CREATE CONTINUOUS QUERY {_ident(CQ_NAME)} ON {db} RESAMPLE FOR {_RESAMPLE_FOR}"
        f" BEGIN {aggregate_select(store.database)} GROUP BY time(1h), * END",
    )
    return True


async def apply(store: InfluxStore) -> SetupOutcome:
    """Sets up both policies and the continuous query; idempotent, applies a changed period.

    Raises `RetentionNotPermitted` for a user without admin rights, `TimeSeriesError`
    when InfluxDB cannot answer.
    """
    if store.config.create_database:
        await _run(store, f"CREATE DATABASE {_ident(store.database)}")  # a no-op if it exists
    found = await policies(store)
    if not any(p.default for p in found):
        raise StoreUnavailable(f"InfluxDB database {store.database!r} has no default policy")
    changed = await _ensure_raw_policy(store, found, store.config.raw_retention_days)
    changed += await _ensure_hourly_policy(store, found)
    created = await _ensure_continuous_query(store)
    if created:
        changed.append(f"continuous query {CQ_NAME} created")
    raw = next(p.name for p in found if p.default)
    return SetupOutcome(raw_policy=raw, changed=tuple(changed), cq_created=created)


async def aggregate_range(store: InfluxStore, start_ms: int, end_ms: int) -> int:
    """Aggregates whole hours of [start_ms, end_ms) again; returns points written."""
    start = start_ms - start_ms % HOUR_MS
    result = await _run(
        store,
        f"{aggregate_select(store.database)} WHERE time >= {start}ms AND time < {end_ms}ms"
        " GROUP BY time(1h), *",
    )
    return sum(
        int(row[1]) for series in result.get("series", []) for row in series.get("values") or []
    )


async def oldest_ms(store: InfluxStore, since_ms: int) -> int | None:
    """Time of the oldest raw reading at or after `since_ms`, None when there is none."""
    answer = await store.query(
        f"SELECT first(seq) FROM {MEASUREMENT} WHERE time >= {since_ms}ms"  # noqa: S608 -- an int
    )
    result = _result(answer)
    rows = [row for series in result.get("series", []) for row in series.get("values") or []]
    return int(rows[0][0]) if rows else None
