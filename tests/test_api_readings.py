"""A cover's readings from a real influxd: raw, downsampled, bounded, parameters bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from api.readings import InfluxReadingQuery
from core.contract import Reading
from core.timeseries import InfluxConfig, InfluxStore, line_of
from tests.servers import InfluxServer, free_port
from tests.test_api_harness import DRAIN_COVER, T0, WATER_COVER, RunningApi, running_api

pytestmark = pytest.mark.asyncio

MINUTE_MS = 60_000
START = "2027-01-15T08:00:00Z"  # T0


@pytest_asyncio.fixture
async def store(influx_server: InfluxServer, influx_db: str) -> AsyncIterator[InfluxStore]:
    influx = InfluxStore(InfluxConfig(url=influx_server.url, database=influx_db))
    yield influx
    await influx.close()


@pytest_asyncio.fixture
async def api(tmp_path: Path, store: InfluxStore) -> AsyncIterator[RunningApi]:
    # The store is the subject here; SQLite is enough for the registry behind it.
    async with running_api(
        f"sqlite:///{tmp_path / 'readings.db'}", readings=InfluxReadingQuery(store)
    ) as running:
        yield running


async def write(store: InfluxStore) -> None:
    """dev-1 on WATER's cover, a reading a minute for 30 minutes from T0, tilt = minute;
    dev-2 on DRAIN's cover, one reading (that must not leak into WATER's answers)."""
    lines = [
        line_of(
            Reading("dev-1", minute, T0 + minute * MINUTE_MS, float(minute), 2.0 * minute,
                    water_level_cm=50.0 if minute % 2 else None, battery_v=3.6, rssi_dbm=-80),
            WATER_COVER,
        )
        for minute in range(30)
    ]  # fmt: skip
    lines.append(line_of(Reading("dev-2", 1, T0, 99.0, 99.0), DRAIN_COVER))
    await store.write(lines)


async def get(api: RunningApi, cover: str = WATER_COVER, **params: str) -> Any:
    return await api.client("viewer").get(f"/api/v1/covers/{cover}/readings", params=params)


async def test_raw_readings_of_a_window(api: RunningApi, store: InfluxStore) -> None:
    await write(store)
    answer = await get(api, start=START, end="2027-01-15T08:05:00Z")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["every_s"], body["buckets"], body["truncated"]) == (None, [], False)
    points = body["points"]
    assert [p["time_ms"] for p in points] == [T0 + m * MINUTE_MS for m in range(5)]  # end excluded
    assert [p["tilt_deg"] for p in points] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [p["water_level_cm"] for p in points] == [None, 50.0, None, 50.0, None]
    assert points[3] | {"time_ms": 0} == {
        "time_ms": 0,
        "device_id": "dev-1",
        "seq": 3,
        "tilt_deg": 3.0,
        "displacement_mm": 6.0,
        "water_level_cm": 50.0,
        "battery_v": 3.6,
        "rssi_dbm": -80.0,
        "temperature_c": None,
    }
    drain = (await get(api, cover=DRAIN_COVER, start=START, end="2027-01-15T09:00:00Z")).json()
    assert [p["tilt_deg"] for p in drain["points"]] == [99.0]


async def test_downsampled_mean_and_max(api: RunningApi, store: InfluxStore) -> None:
    await write(store)
    answer = await get(api, start=START, end="2027-01-15T08:30:00Z", every="10m")
    assert answer.status_code == 200, answer.text
    buckets = answer.json()["buckets"]
    assert [b["time_ms"] for b in buckets] == [T0, T0 + 10 * MINUTE_MS, T0 + 20 * MINUTE_MS]
    assert [b["readings"] for b in buckets] == [10, 10, 10]
    # Minutes 0-9: tilt 0…9, mean 4.5, max 9; displacement twice that.
    assert [(b["mean"]["tilt_deg"], b["max"]["tilt_deg"]) for b in buckets] == [
        (4.5, 9.0),
        (14.5, 19.0),
        (24.5, 29.0),
    ]
    assert buckets[0]["max"]["displacement_mm"] == 18.0
    assert buckets[0]["mean"]["water_level_cm"] == 50.0
    assert buckets[0]["mean"]["temperature_c"] is None
    empty = await get(api, start="2027-01-16T00:00:00Z", end="2027-01-17T00:00:00Z", every="1h")
    assert empty.json()["buckets"] == []


async def test_ranges_and_widths_are_bounded(api: RunningApi) -> None:
    cases = [
        ({"every": "5 minutes"}, "bad_every"),
        ({"every": "0s"}, "bad_every"),
        ({"every": "2d"}, "bad_every"),
        ({"every": "1m); DROP DATABASE x"}, "bad_every"),
        ({"start": "2027-01-15T00:00:00Z", "end": "2027-01-14T00:00:00Z"}, "bad_range"),
        ({"start": "2027-01-15T00:00:00", "end": "2027-01-16T00:00:00Z"}, "bad_range"),
        ({"end": "2027-01-16T00:00:00"}, "bad_range"),
        ({"start": "0001-01-01T00:00:00Z"}, "bad_range"),
        ({"end": "0001-01-01T00:00:00+23:59"}, "bad_range"),
        ({"start": "2026-12-01T00:00:00Z", "end": "2027-01-15T00:00:00Z"}, "range_too_long"),
        ({"start": "2026-01-01T00:00:00Z", "end": "2027-01-15T00:00:00Z", "every": "1d"},
         "range_too_long"),
        ({"start": "2027-01-01T00:00:00Z", "end": "2027-01-15T00:00:00Z", "every": "1m"},
         "too_many_buckets"),
    ]  # fmt: skip
    for params, code in cases:
        answer = await get(api, **params)
        assert (answer.status_code, answer.json()["code"]) == (400, code), params
    unknown = await get(api, cover="4112030101999999")
    assert unknown.status_code == 404
    sneaky = await get(api, cover="4112030101000001' OR '1'='1")
    assert sneaky.status_code == 422  # not a cover number: never reaches the store


async def test_the_default_window_is_the_last_day(api: RunningApi, store: InfluxStore) -> None:
    await write(store)
    api.clock.now = T0 + 60 * MINUTE_MS
    body = (await get(api)).json()
    assert (body["start"], body["end"]) == ("2027-01-14T09:00:00Z", "2027-01-15T09:00:00Z")
    assert len(body["points"]) == 30


async def test_without_a_store_readings_are_unavailable(tmp_path: Path) -> None:
    async with running_api(f"sqlite:///{tmp_path / 'none.db'}", readings=None) as api:
        answer = await get(api)
    assert (answer.status_code, answer.json()["code"]) == (503, "timeseries_unavailable")


async def test_a_store_that_is_down_is_a_503(tmp_path: Path) -> None:
    down = InfluxStore(InfluxConfig(url=f"http://127.0.0.1:{free_port()}", database="x"))
    try:
        async with running_api(
            f"sqlite:///{tmp_path / 'down.db'}", readings=InfluxReadingQuery(down)
        ) as api:
            answer = await get(api)
    finally:
        await down.close()
    assert (answer.status_code, answer.json()["code"]) == (503, "timeseries_unavailable")
