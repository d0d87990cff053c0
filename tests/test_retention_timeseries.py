"""Retention of the time series: policies and continuous query on a real influxd, pruning
and aggregates in the embedded store, and the readings API answering old ranges from the
hourly aggregates on both."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from api.readings import InfluxReadingQuery, ReadingQuery, ReadingWindow, split_at_horizon
from api.readings_sqlite import SqliteReadingQuery
from core import retention_influx
from core.contract import Reading
from core.retention import (
    RetentionMetrics,
    backfill_influx,
    keep_retention,
    maintain_sqlite,
    set_up_influx,
)
from core.timeseries import DAY_MS, InfluxConfig, InfluxStore, line_of
from core.timeseries_sqlite import SqliteReadingStore
from tests.servers import InfluxServer
from tests.test_api_harness import DRAIN_COVER, T0, WATER_COVER, running_api

pytestmark = pytest.mark.asyncio

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
# Five hundred days after the readings below: they are past a 400-day raw retention.
LATER = T0 + 500 * DAY_MS


def readings_at(start_ms: int, count: int = 120) -> list[bytes]:
    """dev-1 on WATER's cover, a reading a minute from `start_ms`, tilt = minute % 60;
    water only on odd minutes; one reading of dev-2 on DRAIN's cover."""
    lines = [
        line_of(
            Reading("dev-1", m, start_ms + m * MINUTE_MS, float(m % 60), 1.0,
                    water_level_cm=40.0 + m if m % 2 else None),
            WATER_COVER,
        )
        for m in range(count)
    ]  # fmt: skip
    lines.append(line_of(Reading("dev-2", 1, start_ms, 99.0, 99.0), DRAIN_COVER))
    return lines


def policies(server: InfluxServer, database: str) -> dict[str, tuple[str, bool]]:
    result = server.query(f'SHOW RETENTION POLICIES ON "{database}"')
    return {row[0]: (row[1], row[4]) for row in result["series"][0]["values"]}


def continuous_queries(server: InfluxServer, database: str) -> list[str]:
    result = server.query("SHOW CONTINUOUS QUERIES")
    return [
        row[0]
        for series in result.get("series", [])
        if series["name"] == database
        for row in series.get("values") or []
    ]


@pytest_asyncio.fixture
async def influx(influx_server: InfluxServer, influx_db: str) -> AsyncIterator[InfluxStore]:
    store = InfluxStore(InfluxConfig(url=influx_server.url, database=influx_db))
    yield store
    await store.close()


# -- InfluxDB: set-up ---------------------------------------------------------------------


async def test_influx_policies_and_continuous_query_are_set_up_once(
    influx: InfluxStore, influx_server: InfluxServer, influx_db: str
) -> None:
    await influx.write(readings_at(T0))  # readings stored before the set-up stay visible

    first = await retention_influx.apply(influx)

    assert first.raw_policy == "autogen"
    assert first.cq_created
    assert policies(influx_server, influx_db) == {
        "autogen": ("9600h0m0s", True),  # 400 days, still the default: writes go there
        "forever": ("0s", False),
    }
    assert continuous_queries(influx_server, influx_db) == [retention_influx.CQ_NAME]
    assert influx_server.count(influx_db) == 121
    again = await retention_influx.apply(influx)
    assert (again.changed, again.cq_created) == ((), False)
    assert continuous_queries(influx_server, influx_db) == [retention_influx.CQ_NAME]


async def test_a_changed_retention_period_is_applied(
    influx_server: InfluxServer, influx_db: str, influx: InfluxStore
) -> None:
    await retention_influx.apply(influx)
    shorter = InfluxStore(
        InfluxConfig(url=influx_server.url, database=influx_db, raw_retention_days=30)
    )
    try:
        outcome = await retention_influx.apply(shorter)
    finally:
        await shorter.close()
    assert outcome.changed == ("raw readings (autogen) kept 30 days",)
    assert policies(influx_server, influx_db)["autogen"] == ("720h0m0s", True)


async def test_influx_set_up_creates_a_missing_database(influx_server: InfluxServer) -> None:
    store = InfluxStore(InfluxConfig(url=influx_server.url, database="retention_fresh"))
    try:
        await retention_influx.apply(store)
        assert "forever" in policies(influx_server, "retention_fresh")
    finally:
        await store.close()
        influx_server.drop_database("retention_fresh")


async def test_hourly_aggregates_of_the_readings_already_stored(
    influx: InfluxStore, influx_server: InfluxServer, influx_db: str
) -> None:
    await retention_influx.apply(influx)
    await influx.write(readings_at(T0))

    written = await backfill_influx(influx, T0 + 3 * HOUR_MS)

    assert written == 3  # dev-1's two hours and dev-2's one
    result = influx_server.query(
        "SELECT readings, tilt_deg_mean, tilt_deg_max, tilt_deg_last, water_level_cm_last"  # noqa: S608 -- a constant cover
        f" FROM forever.cover_reading_hourly WHERE cover_id = '{WATER_COVER}'",
        influx_db,
    )
    rows = result["series"][0]["values"]
    # Tilt 0…59 each hour: mean 29.5, max and last 59; water last on minute 59 / 119.
    assert rows == [[T0, 60, 29.5, 59, 59, 99], [T0 + HOUR_MS, 60, 29.5, 59, 59, 159]]


async def test_the_service_job_sets_retention_up_on_influx(
    influx: InfluxStore, influx_server: InfluxServer, influx_db: str
) -> None:
    registry = CollectorRegistry()
    job = asyncio.create_task(keep_retention(influx, registry))
    try:
        for _ in range(200):
            if registry.get_sample_value("smartcover_retention_applied") == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    assert registry.get_sample_value("smartcover_retention_applied") == 1
    assert continuous_queries(influx_server, influx_db) == [retention_influx.CQ_NAME]


# -- InfluxDB: a user without admin rights --------------------------------------------------


class AuthInfluxServer(InfluxServer):
    """An influxd that asks for credentials."""

    def config_text(self) -> str:
        return super().config_text().replace("auth-enabled = false", "auth-enabled = true")


@pytest.fixture(scope="module")
def auth_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthInfluxServer]:
    with AuthInfluxServer(tmp_path_factory.mktemp("influxd-auth")) as server:
        # The first admin may be created without credentials, as on a fresh install.
        for statement, auth in (
            ("CREATE USER boss WITH PASSWORD 'boss-secret' WITH ALL PRIVILEGES", None),
            ('CREATE DATABASE "pilot"', ("boss", "boss-secret")),
            ('CREATE DATABASE "managed"', ("boss", "boss-secret")),
            ("CREATE USER writer WITH PASSWORD 'writer-secret'", ("boss", "boss-secret")),
            ('GRANT ALL ON "pilot" TO writer', ("boss", "boss-secret")),
            ('GRANT ALL ON "managed" TO writer', ("boss", "boss-secret")),
        ):
            answer = httpx.post(f"{server.url}/query", data={"q": statement}, auth=auth, timeout=10)
            assert answer.status_code == 200, answer.text
            assert "error" not in answer.text, answer.text
        yield server


def as_user(server: AuthInfluxServer, database: str, user: str) -> InfluxStore:
    # The deployment's way: the service's user may not create databases (compose).
    config = InfluxConfig(
        url=server.url,
        database=database,
        username=user,
        password=f"{user}-secret",
        create_database=False,
    )
    return InfluxStore(config)


async def test_without_admin_rights_the_set_up_is_reported_not_fatal(
    auth_influx: AuthInfluxServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = as_user(auth_influx, "pilot", "writer")
    metrics = RetentionMetrics(CollectorRegistry())
    try:
        with caplog.at_level(logging.ERROR, logger="core.retention"):
            outcome = await set_up_influx(store, metrics)
        await store.write(readings_at(T0))  # the service goes on storing readings
    finally:
        await store.close()
    assert outcome is None
    assert metrics.applied._value.get() == 0
    assert "retention NOT set up on InfluxDB database 'pilot'" in caplog.text
    assert "requires admin privilege" in caplog.text


async def test_once_an_admin_has_set_it_up_the_service_user_finds_it_in_place(
    auth_influx: AuthInfluxServer,
) -> None:
    admin, service = (
        as_user(auth_influx, "managed", "boss"),
        as_user(auth_influx, "managed", "writer"),
    )
    metrics = RetentionMetrics(CollectorRegistry())
    try:
        await retention_influx.apply(admin)  # `smartcover retention` with the admin user
        outcome = await set_up_influx(service, metrics)
        assert outcome is not None
        assert await retention_influx.aggregate_range(service, T0, T0 + HOUR_MS) == 0
    finally:
        await admin.close()
        await service.close()
    assert (outcome.changed, outcome.cq_created) == ((), False)
    assert metrics.applied._value.get() == 1


# -- the embedded store -------------------------------------------------------------------


@pytest_asyncio.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[SqliteReadingStore]:
    store = SqliteReadingStore(tmp_path / "ts.db", raw_retention_days=400)
    yield store
    await store.close()


async def maintain_until_idle(store: SqliteReadingStore, now_ms: int) -> int:
    pruned = 0
    while not (step := await maintain_sqlite(store, now_ms)).idle:
        pruned += step.readings_pruned
    return pruned


async def test_old_readings_are_pruned_and_their_aggregates_remain(
    embedded: SqliteReadingStore,
) -> None:
    recent = LATER - 2 * HOUR_MS
    await embedded.write(readings_at(T0) + readings_at(recent, count=10))

    pruned = await maintain_until_idle(embedded, LATER)

    assert pruned == 121  # both hours of dev-1 at T0 and dev-2's one reading
    raw = await embedded.query("SELECT min(ts_ms), count(*) FROM cover_reading")
    assert raw == [(recent, 11)]
    hourly = await embedded.query(
        "SELECT hour_ms, readings, tilt_deg_mean, tilt_deg_max, tilt_deg_last,"
        " water_level_cm_last FROM cover_reading_hourly WHERE cover_id = ? AND hour_ms < ?",
        (WATER_COVER, recent),
    )
    assert hourly == [(T0, 60, 29.5, 59.0, 59.0, 99.0), (T0 + HOUR_MS, 60, 29.5, 59.0, 59.0, 159.0)]
    assert await maintain_until_idle(embedded, LATER) == 0  # nothing left to do


async def test_a_reading_stored_late_is_counted_before_its_hour_is_pruned(
    embedded: SqliteReadingStore,
) -> None:
    await embedded.write(readings_at(T0, count=30))
    await maintain_until_idle(embedded, T0 + 30 * DAY_MS)  # aggregated, not yet expired
    late = line_of(Reading("dev-1", 999, T0 + 59 * MINUTE_MS, 90.0, 1.0), WATER_COVER)
    await embedded.write([late])

    await maintain_until_idle(embedded, LATER)

    hourly = await embedded.query(
        "SELECT readings, tilt_deg_max FROM cover_reading_hourly WHERE cover_id = ?",
        (WATER_COVER,),
    )
    assert hourly == [(31, 90.0)]


async def test_pruning_in_small_transactions_keeps_the_aggregates_whole(
    embedded: SqliteReadingStore,
) -> None:
    await embedded.write(readings_at(T0))
    horizon = LATER - 400 * DAY_MS
    deleted = [await embedded.prune(before_ms=horizon, max_rows=25) for _ in range(7)]

    assert deleted == [25, 25, 11, 25, 25, 10, 0]  # an hour at a time, 25 rows at most
    hourly = await embedded.query(
        "SELECT hour_ms, readings, tilt_deg_max FROM cover_reading_hourly WHERE cover_id = ?",
        (WATER_COVER,),
    )
    assert hourly == [(T0, 60, 59.0), (T0 + HOUR_MS, 60, 59.0)]


async def test_the_service_job_prunes_the_embedded_store(embedded: SqliteReadingStore) -> None:
    await embedded.write(readings_at(T0))
    registry = CollectorRegistry()
    job = asyncio.create_task(keep_retention(embedded, registry, clock_ms=lambda: LATER))
    try:
        for _ in range(200):
            if registry.get_sample_value("smartcover_retention_pruned_readings_total") == 121:
                break
            await asyncio.sleep(0.05)
    finally:
        job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    assert registry.get_sample_value("smartcover_retention_pruned_readings_total") == 121
    assert await embedded.query("SELECT count(*) FROM cover_reading") == [(0,)]


# -- the readings API over both stores --------------------------------------------------


@pytest.mark.parametrize(
    ("every_s", "start", "end", "expected"),
    [
        (300, 0, 10 * DAY_MS, (None, (0, 10 * DAY_MS))),  # sub-hour: raw only
        (3600, 0, 2 * DAY_MS, ((0, 2 * DAY_MS), None)),  # all before the horizon
        (3600, 6 * DAY_MS, 7 * DAY_MS, (None, (6 * DAY_MS, 7 * DAY_MS))),  # all after
        (86_400, 0, 9 * DAY_MS, ((0, 6 * DAY_MS), (6 * DAY_MS, 9 * DAY_MS))),  # a day bucket
    ],
)
async def test_a_window_is_split_where_raw_readings_begin(
    every_s: int, start: int, end: int, expected: tuple[Any, Any]
) -> None:
    horizon = 5 * DAY_MS + 3 * HOUR_MS  # raw readings from here on
    old, recent = split_at_horizon(ReadingWindow("c", start, end), every_s, horizon)
    spans = tuple(None if w is None else (w.start_ms, w.end_ms) for w in (old, recent))
    assert spans == expected


async def _long_range_answer(query: ReadingQuery, tmp_path: Path) -> dict[str, Any]:
    async with running_api(f"sqlite:///{tmp_path / 'api.db'}", readings=query) as api:
        answer = await api.client("viewer").get(
            f"/api/v1/covers/{WATER_COVER}/readings",
            params={"start": "2027-01-15T00:00:00Z", "end": "2027-01-17T00:00:00Z", "every": "1d"},
        )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _expected_buckets() -> list[dict[str, Any]]:
    day = T0 - T0 % DAY_MS
    mean = dict.fromkeys(("battery_v", "rssi_dbm", "temperature_c"))
    return [
        {
            "time_ms": day,
            "readings": 120,
            # Hourly means: water 70 (odd minutes 1…59 → 41…99) and 130; each hour once.
            "mean": {"tilt_deg": 29.5, "displacement_mm": 1.0, "water_level_cm": 100.0, **mean},
            "max": {"tilt_deg": 59.0, "displacement_mm": 1.0, "water_level_cm": 159.0, **mean},
        }
    ]


async def test_influx_answers_a_long_range_from_aggregates(
    influx: InfluxStore, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    await retention_influx.apply(influx)
    await influx.write(readings_at(T0))
    await retention_influx.aggregate_range(influx, T0, T0 + 2 * HOUR_MS)
    influx_server.execute("DROP MEASUREMENT cover_reading", influx_db)  # expired, as it were

    body = await _long_range_answer(InfluxReadingQuery(influx, clock_ms=lambda: LATER), tmp_path)

    assert (body["every_s"], body["points"], body["truncated"]) == (86_400, [], False)
    assert body["buckets"] == _expected_buckets()


async def test_sqlite_answers_a_long_range_from_aggregates(
    embedded: SqliteReadingStore, tmp_path: Path
) -> None:
    await embedded.write(readings_at(T0))
    await maintain_until_idle(embedded, LATER)

    body = await _long_range_answer(SqliteReadingQuery(embedded, clock_ms=lambda: LATER), tmp_path)

    assert (body["every_s"], body["points"], body["truncated"]) == (86_400, [], False)
    assert body["buckets"] == _expected_buckets()


async def test_a_store_without_retention_statements_is_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The one seam: an InfluxDB v1-compatible endpoint (2.x/3.x) that refuses retention DDL.
    def refuse(request: httpx.Request) -> httpx.Response:
        error = {"error": "statement not supported: SHOW RETENTION POLICIES"}
        return httpx.Response(200, json={"results": [{"statement_id": 0, **error}]})

    store = InfluxStore(
        InfluxConfig(url="http://influx.invalid", database="pilot", create_database=False),
        transport=httpx.MockTransport(refuse),
    )
    metrics = RetentionMetrics(CollectorRegistry())
    try:
        with caplog.at_level(logging.ERROR, logger="core.retention"):
            outcome = await set_up_influx(store, metrics)
    finally:
        await store.close()
    assert outcome is None
    assert "statement not supported" in caplog.text
