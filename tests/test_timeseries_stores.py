"""One test-suite for both time-series stores: InfluxDB (real influxd) and embedded SQLite."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from core.contract import Reading
from core.timeseries import InfluxConfig, InfluxStore, ReadingStore, StoreRejected
from core.timeseries_sqlite import FIELDS, SqliteReadingStore
from tests.servers import InfluxServer

pytestmark = pytest.mark.asyncio
NOW = time.time_ns() // 1_000_000 - 3_600_000


@dataclass
class StoreUnderTest:
    store: ReadingStore
    rows: Callable[[], Awaitable[list[dict[str, Any]]]]


@pytest_asyncio.fixture(params=["influxdb", "sqlite"])
async def subject(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreUnderTest]:
    if request.param == "influxdb":
        server: InfluxServer = request.getfixturevalue("influx_server")
        database: str = request.getfixturevalue("influx_db")
        influx = InfluxStore(InfluxConfig(url=server.url, database=database))

        async def influx_rows() -> list[dict[str, Any]]:
            return server.points(database)

        yield StoreUnderTest(influx, influx_rows)
        await influx.close()
        return
    embedded = SqliteReadingStore(tmp_path / "ts.db")
    columns = ("device_id", "time", "cover_id", *FIELDS, "seq")

    async def sqlite_rows() -> list[dict[str, Any]]:
        rows = await embedded.query(
            f"SELECT device_id, ts_ms, cover_id, {', '.join(FIELDS)}, seq FROM cover_reading "  # noqa: S608 -- constant column names
            "ORDER BY ts_ms"
        )
        return [dict(zip(columns, row, strict=True)) for row in rows]

    yield StoreUnderTest(embedded, sqlite_rows)
    await embedded.close()


def reading(device: str, seq: int, **values: float) -> Reading:
    fields: dict[str, Any] = {"tilt_deg": 1.5, "displacement_mm": 0.0, **values}
    return Reading(device, seq, NOW + seq * 1000, **fields)


async def test_points_round_trip_with_tags_and_device_time(subject: StoreUnderTest) -> None:
    readings = [
        reading("dev-a", 0, water_level_cm=42.5, battery_v=3.61, rssi_dbm=-87, temperature_c=11.0),
        reading("dev-b", 1),
    ]
    await subject.store.write(subject.store.encode(readings, ["4112030102000001", None]))
    rows = await subject.rows()
    assert len(rows) == 2
    first, second = rows
    assert (first["device_id"], first["time"], first["cover_id"], first["seq"]) == (
        "dev-a",
        NOW,
        "4112030102000001",
        0,
    )
    assert (first["water_level_cm"], first["battery_v"], first["rssi_dbm"]) == (42.5, 3.61, -87.0)
    assert (second["device_id"], second["cover_id"], second["water_level_cm"]) == (
        "dev-b",
        None,
        None,
    )


async def test_rewriting_a_point_overwrites_it(subject: StoreUnderTest) -> None:
    store = subject.store
    await store.write(store.encode([reading("dev-a", 0, tilt_deg=1.0)], [None]))
    await store.write(store.encode([reading("dev-a", 0, tilt_deg=2.0)], [None]))
    rows = await subject.rows()
    assert [row["tilt_deg"] for row in rows] == [2.0]


async def test_many_points_in_one_write(subject: StoreUnderTest) -> None:
    readings = [reading(f"dev-{i % 7}", i) for i in range(2000)]
    await subject.store.write(subject.store.encode(readings, [None] * len(readings)))
    assert len(await subject.rows()) == 2000


async def test_a_garbled_point_is_rejected(subject: StoreUnderTest) -> None:
    with pytest.raises(StoreRejected):
        await subject.store.write([b"cover_reading,device_id=x tilt_deg=oops 12"])


async def test_ping(subject: StoreUnderTest) -> None:
    await subject.store.ping()
