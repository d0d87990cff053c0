"""End to end through real Mosquitto and InfluxDB: counts, timestamps, dead letters, faults."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from pathlib import Path

import pytest

from core.contract import Reason
from device_sim.load import LoadPlan, run_load
from ingest.bootstrap import deadletter_log
from tests.harness import (
    ServiceProcess,
    SteadyPublisher,
    kill_hard,
    reading,
    running_service,
    service_env,
    settings_of,
    wait_until,
)
from tests.servers import InfluxServer, MosquittoServer

pytestmark = pytest.mark.asyncio

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def counts_by_device(influx: InfluxServer, db: str) -> dict[str, int]:
    answer = influx.query("SELECT count(seq) FROM cover_reading GROUP BY device_id", db=db)
    series = answer.get("series", [])
    return {s["tags"]["device_id"]: s["values"][0][1] for s in series}


async def test_20000_readings_from_500_devices_stored_with_device_timestamps(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    start_ms = now_ms() - HOUR_MS
    plan = LoadPlan(url=mosquitto.url, readings=20000, devices=500, processes=2, start_ms=start_ms)
    async with running_service(env) as parts:
        result = await asyncio.to_thread(run_load, plan)
        assert result.acknowledged == 20000
        await wait_until(
            lambda: influx_server.count(influx_db) >= 20000,
            timeout_s=60,
            interval_s=0.5,
            what="20,000 points",
        )
    assert influx_server.count(influx_db) == 20000
    assert counts_by_device(influx_server, influx_db) == {plan.device_id(i): 40 for i in range(500)}
    points = influx_server.points(influx_db)
    assert all(p["time"] == start_ms + p["seq"] * 1000 for p in points)
    assert parts.metrics.totals.acknowledged == 20000
    assert parts.metrics.totals.dead_lettered == 0


def bad_messages(device: str, ts: int) -> list[tuple[str, bytes, Reason]]:
    topic = f"covers/{device}/telemetry"
    good = reading(device, 0, ts)
    return [
        (topic, b"{not json", Reason.BAD_JSON),
        (topic, b"[1, 2]", Reason.NOT_OBJECT),
        (topic, json.dumps({"device_id": device, "seq": 1}).encode(), Reason.SCHEMA),
        (f"covers/other-{device}/telemetry", json.dumps(good).encode(), Reason.TOPIC_MISMATCH),
        (topic, json.dumps({**good, "tilt_deg": 181}).encode(), Reason.OUT_OF_RANGE),
        (topic, json.dumps({**good, "pad": "x" * 9000}).encode(), Reason.TOO_LARGE),
        (topic, json.dumps({**good, "ts": now_ms() + HOUR_MS}).encode(), Reason.FUTURE_TS),
        (topic, json.dumps({**good, "ts": now_ms() - 8 * 24 * HOUR_MS}).encode(), Reason.STALE_TS),
    ]


async def test_every_reason_code_dead_lettered_and_good_readings_kept(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    device, ts = "dl-1", now_ms() - 60_000
    bad = bad_messages(device, ts)
    batch = {
        "device_id": device,
        "readings": [
            {k: v for k, v in reading(device, 10, ts + 10).items() if k != "device_id"},
            {"seq": 11, "ts": ts + 11, "tilt_deg": -5, "displacement_mm": 0},
            {k: v for k, v in reading(device, 12, ts + 12).items() if k != "device_id"},
            "not an object",
        ],
    }
    messages = [(t, p) for t, p, _ in bad]
    messages += [
        (f"covers/{device}/telemetry", json.dumps(reading(device, s, ts + s)).encode())
        for s in (1, 2)
    ]
    messages.append((f"covers/{device}/telemetry", json.dumps(batch).encode()))
    async with running_service(env) as parts:
        await SteadyPublisher(mosquitto.url, "dl-pub").publish_all(messages, rate_per_s=500)
        await wait_until(
            lambda: parts.metrics.totals.acknowledged == len(messages),
            timeout_s=10,
            what="every message acknowledged",
        )
    stored = sorted(p["seq"] for p in influx_server.points(influx_db))
    assert stored == [1, 2, 10, 12]
    by_reason = parts.metrics.totals.dead_letters_by_reason
    expected = {reason.value: 1 for _, _, reason in bad}
    expected[Reason.OUT_OF_RANGE.value] += 1  # the batch's tilt of -5
    expected[Reason.NOT_OBJECT.value] += 1  # the batch's string item
    assert by_reason == expected
    logged = deadletter_log(settings_of(env)).newest(100)
    assert sorted(letter.reason for letter in logged) == sorted(
        reason for reason, count in expected.items() for _ in range(count)
    )
    assert all(len(letter.payload) <= 512 for letter in logged)


async def test_sigterm_stores_everything_received_and_logs_a_summary(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(
        mosquitto, influx_server, influx_db, tmp_path, SMARTCOVER_BATCH_MAX_AGE_MS="5000"
    )  # nothing flushes by age meanwhile
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    try:
        await wait_until(
            lambda: "MQTT connected" in service.log(), timeout_s=15, what="the service to connect"
        )
        plan = LoadPlan(
            url=mosquitto.url, readings=3000, devices=30, processes=1, start_ms=now_ms() - HOUR_MS
        )
        await asyncio.to_thread(run_load, plan)
        await asyncio.sleep(0.5)  # most, perhaps not all, reach the service meanwhile
        service.signal(signal.SIGTERM)
        assert service.wait(15) == 0
        [summary] = [line for line in service.log().splitlines() if "ingest stopped" in line]
        counts = summary_counts(summary)
        # Everything received was stored and acknowledged before the process ended.
        assert counts["received"] == counts["stored"] == counts["acknowledged"] > 0
        assert influx_server.count(influx_db) == counts["received"]
        service.start()  # the rest waited in the broker for the session
        await wait_until(
            lambda: influx_server.count(influx_db) >= 3000,
            timeout_s=30,
            what="the rest after the restart",
        )
    finally:
        service.close()
    assert influx_server.count(influx_db) == 3000


def summary_counts(line: str) -> dict[str, int]:
    """The numbers of `ingest stopped after …: received N, stored N (replayed N), …`."""
    pattern = r"(received|stored|spooled|acknowledged|dead-lettered) (\d+)"
    return {name: int(value) for name, value in re.findall(pattern, line)}


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_loses_nothing(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    plan = LoadPlan(
        url=mosquitto.url, readings=50000, devices=500, processes=2, start_ms=now_ms() - 2 * HOUR_MS
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    service.start()
    try:
        await wait_until(
            lambda: "MQTT connected" in service.log(), timeout_s=15, what="the service to connect"
        )
        publishing = asyncio.create_task(asyncio.to_thread(run_load, plan))
        await wait_until(
            lambda: influx_server.count(influx_db) >= 5000,
            timeout_s=60,
            interval_s=0.05,
            what="the first 5,000 points",
        )
        kill_hard(service)
        stored_at_kill = influx_server.count(influx_db)
        result = await publishing
        assert result.acknowledged == 50000
        assert stored_at_kill < 50000, "the kill came too late to test anything"
        service.start()
        await wait_until(
            lambda: influx_server.count(influx_db) >= 50000,
            timeout_s=120,
            interval_s=0.5,
            what="all 50,000 points after the restart",
        )
    finally:
        service.close()
    assert counts_by_device(influx_server, influx_db) == {
        plan.device_id(i): 100 for i in range(500)
    }


@pytest.mark.slow
async def test_influxdb_down_for_30_s_spools_then_replays_everything(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    base = now_ms() - HOUR_MS
    messages = [
        (
            f"covers/flood-{i % 20}/telemetry",
            json.dumps(reading(f"flood-{i % 20}", i // 20, base + i)).encode(),
        )
        for i in range(8000)
    ]
    async with running_service(env) as parts:
        publishing = asyncio.create_task(
            SteadyPublisher(mosquitto.url, "steady").publish_all(messages, rate_per_s=200)
        )
        await asyncio.sleep(3)
        influx_server.stop()
        await asyncio.sleep(30)
        spooled_during_outage = parts.metrics.totals.spooled
        assert parts.writer.health.down
        influx_server.start()
        await publishing
        await wait_until(
            lambda: parts.writer.spool_empty and not parts.writer.health.down,
            timeout_s=60,
            what="the spool to drain",
        )
        await wait_until(
            lambda: influx_server.count(influx_db) >= 8000, timeout_s=30, what="all 8,000 points"
        )
    assert spooled_during_outage > 2000  # up to 30 s × 200/s went to the spool
    assert parts.metrics.totals.replayed == parts.metrics.totals.spooled
    assert influx_server.count(influx_db) == 8000
    assert parts.metrics.registry.get_sample_value("smartcover_spool_bytes") == 0


@pytest.mark.slow
async def test_mosquitto_restart_mid_stream_loses_nothing(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(mosquitto, influx_server, influx_db, tmp_path)
    base = now_ms() - HOUR_MS
    messages = [
        (
            f"covers/mq-{i % 10}/telemetry",
            json.dumps(reading(f"mq-{i % 10}", i // 10, base + i)).encode(),
        )
        for i in range(3000)
    ]
    async with running_service(env) as parts:
        publisher = SteadyPublisher(mosquitto.url, "steady-mq")
        publishing = asyncio.create_task(publisher.publish_all(messages, rate_per_s=500))
        await wait_until(lambda: publisher.sent >= 1000, timeout_s=20, what="1,000 sent")
        await asyncio.to_thread(mosquitto.restart)
        await publishing
        await wait_until(
            lambda: influx_server.count(influx_db) >= 3000, timeout_s=30, what="all 3,000 points"
        )
        assert parts.service.broker_connected
    assert influx_server.count(influx_db) == 3000
