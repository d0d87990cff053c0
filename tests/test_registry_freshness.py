"""Registry changes take effect before the API answers, in every process (DESIGN §14).

The service runs in-process on real Mosquitto, influxd and SQLite or PostgreSQL; the
registry is changed through its API (census upload, raw and multipart, device binding) or
by another process, and the very next reading is evaluated with the change.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from alerting.models import AlertRow
from core import registry
from core.db import create_engine, session_factory, transaction, upgrade
from core.registry_schemas import CoverCreate, DeviceCreate
from core.settings import MqttEndpoint
from ingest import mqtt
from smartcover.runtime import Service
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.harness import service_env, serving_in_process, wait_until
from tests.servers import InfluxServer, MosquittoServer, PostgresServer

pytestmark = pytest.mark.asyncio
ADMIN_KEY = "an-admin-key-for-this-test-only"
UNIT = {"code": "DR-CITY", "name": "City drainage company", "kind": "drainage"}
CENSUS_HEADER = "cover_id,kind_code,owner_unit,road,lon,lat,device_id\n"
# Longer than any refresh timer of the old design (5 s): an alert that comes at all came
# from the read-your-writes path, not from a poll catching up.
ALERT_WAIT_S = 15.0


def census(*rows: tuple[str, str]) -> str:
    return CENSUS_HEADER + "".join(
        f"{cover},0103,DR-CITY,Jianshe Road,112.45,34.62,{device}\n" for cover, device in rows
    )


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "fresh")


@pytest_asyncio.fixture
async def service(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
    database_url: str,
) -> AsyncIterator[Service]:
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_DATABASE_URL=database_url,
        SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
    )
    async with serving_in_process(env) as built:
        yield built


def api(service: Service) -> httpx.AsyncClient:
    settings = service.settings
    return httpx.AsyncClient(
        base_url=f"http://{settings.api_host}:{settings.api_port}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )


async def publish_displaced(service: Service, device_id: str, seq: int = 1) -> None:
    reading = {
        "device_id": device_id,
        "seq": seq,
        "ts": time.time_ns() // 1_000_000,
        "tilt_deg": 0.5,
        "displacement_mm": 45.0,
    }
    endpoint = MqttEndpoint.parse(service.settings.mqtt_url.get_secret_value())
    options = mqtt.SessionOptions(f"device-{device_id}", clean_start=True)
    async with mqtt.connect(endpoint, options, lambda _: None) as connection:
        await connection.publish(
            f"covers/{device_id}/telemetry", json.dumps(reading).encode(), qos=1
        )


async def register_elsewhere(database_url: str, device_id: str) -> None:
    """A device registered by another process: its own engine, no API in between."""
    other = create_engine(database_url)
    try:
        async with transaction(session_factory(other)) as session:
            await registry.create_device(session=session, device=DeviceCreate(device_id=device_id))
    finally:
        await other.dispose()


async def alerts_of(service: Service, cover_id: str) -> list[AlertRow]:
    async with transaction(service.sessions, write=False) as session:
        return list(await session.scalars(select(AlertRow).where(AlertRow.cover_id == cover_id)))


async def wait_for_alert(service: Service, cover_id: str) -> AlertRow:
    deadline = time.monotonic() + ALERT_WAIT_S
    while time.monotonic() < deadline:
        found = await alerts_of(service, cover_id)
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no alert for cover {cover_id} within {ALERT_WAIT_S} s")


async def test_a_census_uploaded_through_the_api_is_evaluated_at_once(service: Service) -> None:
    async with api(service) as client:
        assert (await client.post("/api/v1/units", json=UNIT)).status_code == 201
        answer = await client.post(
            "/api/v1/covers/import",
            content=census(("4112030103000001", "SC-A1")).encode(),
            headers={"Content-Type": "text/csv"},
        )
    assert answer.status_code == 200, answer.text
    # The first reading right after the answer: today's registry, no reload awaited.
    await publish_displaced(service, "SC-A1")
    alert = await wait_for_alert(service, "4112030103000001")
    assert alert.kind == "cover_displaced"


async def test_census_upload_as_a_multipart_form_reports_like_the_cli(service: Service) -> None:
    rows = census(("4112030103000002", "SC-B1"), ("4112030103000003", "SC-B2"))
    async with api(service) as client:
        await client.post("/api/v1/units", json=UNIT)
        first = await client.post(
            "/api/v1/covers/import", files={"file": ("census.csv", rows.encode(), "text/csv")}
        )
        again = await client.post(
            "/api/v1/covers/import", files={"file": ("census.csv", rows.encode(), "text/csv")}
        )
        replaced = await client.post(
            "/api/v1/covers/import",
            files={"file": ("census.csv", rows.replace("SC-B2", "SC-B3").encode(), "text/csv")},
        )
        broken = await client.post(
            "/api/v1/covers/import",
            files={"file": ("census.csv", (rows + "123,0103,DR-CITY,X,1,2,\n").encode())},
        )
        no_file = await client.post("/api/v1/covers/import", files={"other": ("x.csv", b"x")})
    assert first.status_code == 200, first.text
    assert (first.json()["inserted"], first.json()["bindings_made"]) == (2, 2)
    assert again.json()["summary"] == "Nothing changed: all 2 valid rows match the registry."
    assert replaced.json()["bindings_ended"] == 1
    assert "1 earlier bindings ended (sensor replaced or moved)" in replaced.json()["summary"]
    assert broken.status_code == 422
    [error] = broken.json()["details"]["errors"]
    assert (error["row"], error["column"]) == (4, "cover_id")
    assert no_file.status_code == 422
    assert no_file.json()["code"] == "no_file"
    await publish_displaced(service, "SC-B3")
    await wait_for_alert(service, "4112030103000003")


async def test_an_unregistered_device_is_listed_then_evaluated_once_registered(
    service: Service,
) -> None:
    await publish_displaced(service, "SC-NEW", seq=1)
    await publish_displaced(service, "SC-NEW", seq=2)
    async with api(service) as client:
        listed: list[dict[str, object]] = []

        async def fetch() -> None:
            page = (await client.get("/api/v1/devices/unregistered")).json()
            listed[:] = page["items"]

        deadline = time.monotonic() + 10
        while not listed or listed[0]["readings"] != 2:
            assert time.monotonic() < deadline, listed
            await asyncio.sleep(0.2)
            await fetch()
        assert listed[0]["device_id"] == "SC-NEW"

        await client.post("/api/v1/units", json=UNIT)
        await client.post(
            "/api/v1/covers/import",
            content=census(("4112030103000004", "")).encode(),
            headers={"Content-Type": "text/csv"},
        )
        created = await client.post("/api/v1/devices", json={"device_id": "SC-NEW"})
        assert created.status_code == 201, created.text
        bound = await client.put(
            "/api/v1/devices/SC-NEW/binding", json={"cover_id": "4112030103000004"}
        )
        assert bound.status_code == 200, bound.text
        await publish_displaced(service, "SC-NEW", seq=3)
        await wait_for_alert(service, "4112030103000004")
        await fetch()
        assert listed == []


async def test_binding_moves_a_sensor_and_the_cover_keeps_its_history(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    async with api(service) as client:
        await client.post("/api/v1/units", json=UNIT)
        await client.post(
            "/api/v1/covers/import",
            content=census(("4112030103000005", "SC-C1"), ("4112030103000006", "")).encode(),
            headers={"Content-Type": "text/csv"},
        )
        await publish_displaced(service, "SC-C1", seq=1)
        await wait_for_alert(service, "4112030103000005")
        moved = await client.put(
            "/api/v1/devices/SC-C1/binding", json={"cover_id": "4112030103000006"}
        )
        assert moved.status_code == 200, moved.text
        await publish_displaced(service, "SC-C1", seq=2)
        await wait_for_alert(service, "4112030103000006")
        # Each reading is tagged with the cover the sensor was on when it was taken.
        await wait_until(lambda: len(influx_server.points(influx_db)) == 2, timeout_s=10)
        tagged = [(p["seq"], p["cover_id"]) for p in influx_server.points(influx_db)]
        assert sorted(tagged) == [(1, "4112030103000005"), (2, "4112030103000006")]
        history = (await client.get("/api/v1/covers/4112030103000005/bindings")).json()
        assert [(b["device_id"], b["end_reason"]) for b in history] == [("SC-C1", "moved")]
        unbound = await client.delete("/api/v1/devices/SC-C1/binding")
        assert unbound.json()["end_reason"] == "unbound"
        again = await client.delete("/api/v1/devices/SC-C1/binding")
        assert again.status_code == 404
        device = (await client.get("/api/v1/devices/SC-C1/bindings")).json()
        assert [b["cover_id"] for b in device] == ["4112030103000005", "4112030103000006"]


async def test_a_change_by_another_process_is_evaluated_with_the_next_reading(
    service: Service, database_url: str
) -> None:
    async with api(service) as client:
        await client.post("/api/v1/units", json=UNIT)
    # Another process: its own engine, its own connection, no API in between.
    other = create_engine(database_url)
    try:
        await upgrade(other)
        async with transaction(session_factory(other)) as session:
            await registry.create_cover(
                session=session,
                cover=CoverCreate(
                    cover_id="4112030103000007",
                    owner_unit="DR-CITY",
                    road="Jianshe Road",
                    lon=112.45,
                    lat=34.62,
                ),
            )
            await registry.create_device(session=session, device=DeviceCreate(device_id="SC-D1"))
            await registry.bind_device(
                session=session, device_id="SC-D1", cover_id="4112030103000007"
            )
    finally:
        await other.dispose()
    await publish_displaced(service, "SC-D1")
    await wait_for_alert(service, "4112030103000007")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgresql_notifies_other_processes_without_waiting_for_a_poll(
    service: Service, database_url: str
) -> None:
    await register_elsewhere(database_url, "SC-E1")
    # The backup poll runs every 30 s on PostgreSQL: seen sooner means notified.
    await wait_until(
        lambda: service.cache.lookup("SC-E1") is not None, timeout_s=10, what="notification"
    )


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_notifications_resume_after_postgresql_restarts(
    service: Service, database_url: str, postgres_server: PostgresServer
) -> None:
    await asyncio.to_thread(postgres_server.restart)
    await register_elsewhere(database_url, "SC-F1")
    # The listener reconnects within seconds (and reloads then); the poll would take 30 s.
    await wait_until(
        lambda: service.cache.lookup("SC-F1") is not None, timeout_s=15, what="notification"
    )
