"""Bounded housekeeping: a full spool holds acknowledgement back (real Mosquitto and influxd)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from tests.harness import SteadyPublisher, reading, running_service, service_env, wait_until
from tests.servers import InfluxServer, MosquittoServer

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the spool ---------------------------------------------------------------------------

# About 300 readings: full after a few batches of 100.
SPOOL_MAX_MB = 0.05
READINGS = 2000


@pytest.mark.asyncio
async def test_full_spool_stops_acknowledging_and_loses_nothing(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.writer")
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_SPOOL_MAX_MB=str(SPOOL_MAX_MB),
        SMARTCOVER_BATCH_SIZE="100",
        SMARTCOVER_MQTT_RECEIVE_MAXIMUM="200",
    )
    base = now_ms() - HOUR_MS
    messages = [
        (f"covers/full-{i % 10}/telemetry", json.dumps(reading(f"full-{i % 10}", i, base + i)))
        for i in range(READINGS)
    ]
    async with running_service(env) as parts:
        sample = parts.metrics.registry.get_sample_value
        influx_server.stop()
        try:
            publisher = SteadyPublisher(mosquitto.url, "full-pub")
            await publisher.publish_all(((t, p.encode()) for t, p in messages), rate_per_s=1000)
            await wait_until(
                lambda: sample("smartcover_spool_full") == 1, timeout_s=30, what="a full spool"
            )
            # Everything is with the broker; only what the spool took was acknowledged.
            totals = parts.metrics.totals
            assert totals.acknowledged == totals.spooled < READINGS
            assert (sample("smartcover_spool_bytes") or 0) <= SPOOL_MAX_MB * 1024 * 1024
        finally:
            influx_server.start()
        await wait_until(
            lambda: influx_server.count(influx_db) >= READINGS,
            timeout_s=60,
            interval_s=0.5,
            what="every reading after the store came back",
        )
        await wait_until(lambda: parts.writer.spool_empty, timeout_s=30, what="the spool to drain")
    assert influx_server.count(influx_db) == READINGS
    assert parts.metrics.totals.acknowledged == READINGS
    assert parts.metrics.registry.get_sample_value("smartcover_spool_full") == 0
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("spool full") for line in logged)
    assert any(line.startswith("spool no longer full") for line in logged)
