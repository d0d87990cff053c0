"""`smartcover retention`: the set-up run once by hand, on a real influxd and the embedded store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.clock import wall_clock_ms
from core.contract import Reading
from core.timeseries import DAY_MS, line_of
from core.timeseries_sqlite import SqliteReadingStore
from smartcover.cli import app
from tests.servers import InfluxServer


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SMARTCOVER_LOG_LEVEL", "WARNING")
    monkeypatch.chdir(tmp_path)  # no .env of the developer's


def test_retention_on_influx_then_nothing_to_change(
    influx_server: InfluxServer, influx_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMARTCOVER_INFLUX_URL", influx_server.url)
    monkeypatch.setenv("SMARTCOVER_INFLUX_DB", influx_db)
    monkeypatch.setenv("SMARTCOVER_RETENTION_RAW_DAYS", "90")
    runner = CliRunner()

    first = runner.invoke(app, ["retention"])
    again = runner.invoke(app, ["retention"])

    assert first.exit_code == 0, first.output
    assert "raw readings (autogen) kept 90 days" in first.output
    assert "continuous query cover_reading_hourly_v1 created" in first.output
    assert again.exit_code == 0, again.output
    assert "nothing to change" in again.output
    rows = influx_server.query(f'SHOW RETENTION POLICIES ON "{influx_db}"')["series"][0]["values"]
    assert ["autogen", "2160h0m0s"] in [row[:2] for row in rows]


def test_retention_on_influx_refused_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTCOVER_INFLUX_URL", "http://127.0.0.1:9")  # nothing listens
    result = CliRunner().invoke(app, ["retention"])
    assert result.exit_code == 1
    assert "Retention not set up" in result.output


def test_retention_on_the_embedded_store_prunes_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ts.db"
    long_ago = wall_clock_ms() - 500 * DAY_MS
    store = SqliteReadingStore(path)
    asyncio.run(store.write([line_of(Reading("dev-1", 1, long_ago, 1.0, 2.0), "c1")]))
    asyncio.run(store.close())
    monkeypatch.setenv("SMARTCOVER_TIMESERIES_PATH", str(path))

    result = CliRunner().invoke(app, ["retention"])

    assert result.exit_code == 0, result.output
    assert "1 readings older than 400 days pruned" in result.output
