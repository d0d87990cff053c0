"""HTTP push from IoT platforms on real servers: each platform's documented message is
authenticated, decoded by the device's model, stored in InfluxDB and evaluated; wrong
signatures store nothing; redelivery duplicates nothing; a store outage answers 503."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from alerting.models import AlertRow
from core import registry
from core.db import create_engine, session_factory, transaction, upgrade
from core.deadletters import DeadLetterLog
from core.registry_schemas import DeviceUpdate
from smartcover.runtime import Service
from smartcover.seed import plan_pilot, seed_pilot
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.harness import service_env, serving_in_process, wait_until
from tests.servers import InfluxServer, MosquittoServer

pytestmark = pytest.mark.asyncio
VECTORS = Path(__file__).parent / "vectors"
ADMIN_KEY = "an-admin-key-for-this-test-only"
TOKENS = {
    "ct": "ctwing-token-1234",
    "one": "onenet-token-5678",
    "hw": "iotda-token-9012",
    "gw": "gateway-token-3456",
}
# The pilot's first four devices, each known to one source by the vectors' ids.
EXTERNAL = {
    "ct": "867725030000001",
    "one": "2016617",
    "hw": "5f1e2c0d8e3c_868120000000003",
    "gw": "gw-0001",
}
SOURCES = f"""
[sources.ct]
kind = "ctwing"
token = "{TOKENS["ct"]}"
model = "vendor-m20-hex"
allow = ["127.0.0.0/8"]

[sources.one]
kind = "onenet"
token = "{TOKENS["one"]}"
model = "vendor-jc300-json"

[sources.hw]
kind = "iotda"
token = "{TOKENS["hw"]}"

[sources.gw]
kind = "http-json"
token = "{TOKENS["gw"]}"

[sources.lora]
kind = "chirpstack"

[sources.lan]
kind = "http-json"
token = "{TOKENS["gw"]}"
allow = ["10.20.0.0/16"]
"""


def vector(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return document


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def seeded_database(database_url: str) -> str:
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    await seed_pilot(sessions, plan_pilot(4))
    async with transaction(sessions) as session:
        for cover, source in zip(plan_pilot(4), EXTERNAL, strict=True):
            update = DeviceUpdate(source=source, external_id=EXTERNAL[source])
            await registry.update_device(session=session, device_id=cover.device_id, update=update)
    await engine.dispose()
    return database_url


@contextlib.asynccontextmanager
async def running(
    mosquitto: MosquittoServer,
    influx: InfluxServer,
    db: str,
    tmp_path: Path,
    database_url: str,
    **extra: str,
) -> AsyncIterator[Service]:
    (tmp_path / "sources.toml").write_text(SOURCES)
    env = service_env(
        mosquitto,
        influx,
        db,
        tmp_path,
        SMARTCOVER_DATABASE_URL=await seeded_database(database_url),
        SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
        SMARTCOVER_SOURCES_FILE=str(tmp_path / "sources.toml"),
        **extra,
    )
    async with serving_in_process(env) as built:
        yield built


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "push")


@pytest_asyncio.fixture
async def service(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
    database_url: str,
) -> AsyncIterator[Service]:
    async with running(mosquitto, influx_server, influx_db, tmp_path, database_url) as built:
        yield built


def client(service: Service) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.settings.api_port}")


async def alerts(service: Service) -> list[tuple[str, str | None]]:
    async with transaction(service.sessions, write=False) as session:
        rows = await session.scalars(select(AlertRow))
        return [(row.kind, row.device_id) for row in rows]


def ctwing_body(ago_ms: int = 0) -> bytes:
    document = vector("ctwing_data_report.json")
    document["timestamp"] = now_ms() - ago_ms
    return json.dumps(document).encode()


async def test_ctwing_report_is_stored_evaluated_and_redelivery_changes_nothing(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    device = plan_pilot(3)[0].device_id
    body = ctwing_body()
    async with client(service) as http:
        wrong = await http.post("/ingest/v1/ct", params={"token": "guess"}, content=body)
        assert wrong.status_code == 401
        assert influx_server.count(influx_db) == 0
        answer = await http.post("/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=body)
        # 200 means stored and evaluated: no waiting for either afterwards.
        assert answer.status_code == 200, answer.text
        assert influx_server.count(influx_db) == 1
        assert await alerts(service) == [("cover_open", device)]
        again = await http.post("/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=body)
        assert again.status_code == 200
        report = vector("ctwing_online_report.json")
        for event, ago_ms in ((1, 0), (0, 60_000)):  # online now; offline, but older
            report.update(eventType=event, timestamp=now_ms() - ago_ms)
            status = await http.post(
                "/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=json.dumps(report)
            )
            assert status.status_code == 200
        metrics = (await http.get("/metrics")).text
    async with transaction(service.sessions, write=False) as session:
        recorded = await registry.get_device(session=session, device_id=device)
    assert recorded.online is True  # the late offline report changed nothing
    assert recorded.status_at is not None
    [point] = influx_server.points(influx_db)
    assert (point["device_id"], point["seq"]) == (device, 3)  # the frame's seq
    assert (point["tilt_deg"], point["water_level_cm"], point["rssi_dbm"]) == (52.0, 35.0, -81)
    assert point["cover_id"] == plan_pilot(3)[0].cover_id
    assert await alerts(service) == [("cover_open", device)]
    assert 'smartcover_push_refused_total{reason="bad_signature",source="ct"} 1.0' in metrics
    assert 'smartcover_push_status_messages_total{source="ct"} 2.0' in metrics


def onenet_signed(msg_text: str, token: str, nonce: str = "Xk3Tq9Ab") -> bytes:
    digest = hashlib.md5((token + nonce + msg_text).encode(), usedforsecurity=False).digest()
    signature = base64.b64encode(digest).decode()
    return f'{{"msg":{msg_text},"msg_signature":"{signature}","nonce":"{nonce}"}}'.encode()


async def test_onenet_verifies_its_url_and_signed_pushes_only(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    msg = vector("onenet_datapoint_msg.json")
    msg["at"] = now_ms()
    msg["value"]["time"] = now_ms() // 1000
    msg_text = json.dumps(msg, separators=(",", ":"))
    token = TOKENS["one"]
    check = hashlib.md5((token + "n0nce" + "hello").encode(), usedforsecurity=False).digest()
    async with client(service) as http:
        params = {"msg": "hello", "nonce": "n0nce", "signature": base64.b64encode(check).decode()}
        verified = await http.get("/ingest/v1/one", params=params)
        assert (verified.status_code, verified.text) == (200, "hello")
        forged = await http.get("/ingest/v1/one", params={**params, "signature": "AAAA"})
        assert forged.status_code == 401
        bad = await http.post("/ingest/v1/one", content=onenet_signed(msg_text, "not-the-token"))
        assert bad.status_code == 401
        assert influx_server.count(influx_db) == 0
        good = await http.post("/ingest/v1/one", content=onenet_signed(msg_text, token))
        assert good.status_code == 200, good.text
    [point] = influx_server.points(influx_db)
    device = plan_pilot(3)[1].device_id
    assert (point["device_id"], point["seq"], point["tilt_deg"]) == (device, 11, 1.2)
    assert (point["displacement_mm"], point["water_level_cm"]) == (31.5, 95.0)
    assert await alerts(service) == [("cover_displaced", device)]


async def test_iotda_property_report_is_stored_and_raises_an_alert(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    document = vector("iotda_property_report.json")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    document["notify_data"]["body"]["services"][0]["event_time"] = stamp
    async with client(service) as http:
        no_token = await http.post("/ingest/v1/hw", json=document)
        assert no_token.status_code == 401
        answer = await http.post("/ingest/v1/hw", params={"token": TOKENS["hw"]}, json=document)
        assert answer.status_code == 200, answer.text
        listed = await http.get("/api/v1/sources", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    [point] = influx_server.points(influx_db)
    device = plan_pilot(3)[2].device_id
    assert (point["device_id"], point["seq"], point["displacement_mm"]) == (device, 21, 25.0)
    assert await alerts(service) == [("cover_displaced", device)]
    assert [(s["name"], s["kind"], s["has_token"]) for s in listed.json()] == [
        ("ct", "ctwing", True),
        ("gw", "http-json", True),
        ("hw", "iotda", True),
        ("lan", "http-json", True),
        ("lora", "chirpstack", False),
        ("one", "onenet", True),
    ]
    assert TOKENS["hw"] not in listed.text


async def test_an_unknown_external_id_is_held_and_replayed_once_registered(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    document = json.loads(ctwing_body())
    document["IMEI"] = "860000000000099"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with client(service) as http:
        answer = await http.post(
            "/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=json.dumps(document)
        )
        assert answer.status_code == 200
        assert influx_server.count(influx_db) == 0
        unknown = (await http.get("/api/v1/sources/unknown", headers=admin)).json()
        assert [(u["source"], u["external_id"], u["readings"]) for u in unknown] == [
            ("ct", "860000000000099", 1)
        ]
        nothing = await http.post("/api/v1/sources/ct/replay", headers=admin)
        assert nothing.json() == {"held": 0, "stored": 0, "dead_lettered": 0}
        device = {"device_id": "NB-99", "source": "ct", "external_id": "860000000000099"}
        created = await http.post("/api/v1/devices", headers=admin, json=device)
        assert created.status_code == 201, created.text
        replayed = await http.post("/api/v1/sources/ct/replay", headers=admin)
        assert replayed.json() == {"held": 1, "stored": 1, "dead_lettered": 0}
        assert (await http.get("/api/v1/sources/unknown", headers=admin)).json() == []
    [point] = influx_server.points(influx_db)
    assert (point["device_id"], point["seq"], point["tilt_deg"]) == ("NB-99", 3, 52.0)
    assert point["time"] == document["timestamp"]  # the platform's time, kept while held
    log = DeadLetterLog(service.settings.spool_dir / "deadletters.jsonl", 100)
    [letter] = log.newest(10)
    assert (letter.reason, letter.topic) == ("unknown_device", "ingest/ct/860000000000099")
    assert letter.payload == "AA550102000000031450000C015E0E1000D7AF78"  # the frame, as hex


async def test_a_store_outage_answers_503_and_the_redelivery_is_stored_once(
    mosquitto: MosquittoServer, tmp_path: Path
) -> None:
    with InfluxServer(tmp_path / "influxd") as influx:
        influx.create_database("outage")
        # A spool of one batch: with the store down, the first push is spooled (durable:
        # 200), the next finds no room and cannot be made durable.
        async with running(
            mosquitto,
            influx,
            "outage",
            tmp_path,
            f"sqlite:///{tmp_path / 'smartcover.db'}",
            SMARTCOVER_SPOOL_MAX_MB="0.000001",
            SMARTCOVER_PUSH_DEADLINE_S="2",
        ) as service:
            spooled, body = ctwing_body(ago_ms=2000), ctwing_body()
            async with client(service) as http:
                influx.stop()
                first = await http.post(
                    "/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=spooled
                )
                assert first.status_code == 200
                down = await http.post(
                    "/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=body
                )
                assert down.status_code == 503
                influx.start()
                await wait_until(lambda: not service.ingest.writer.health.down, timeout_s=20)
                again = await http.post(
                    "/ingest/v1/ct", params={"token": TOKENS["ct"]}, content=body
                )
                assert again.status_code == 200, again.text
            await wait_until(lambda: influx.count("outage") == 2, timeout_s=10)
            assert len(await alerts(service)) == 1


async def test_http_json_takes_a_v1_batch_and_an_address_outside_allow_is_refused(
    service: Service, influx_server: InfluxServer, influx_db: str
) -> None:
    ts = now_ms()
    batch = {
        "device_id": EXTERNAL["gw"],
        "readings": [
            {"seq": 1, "ts": ts - 1000, "tilt_deg": 0.5, "displacement_mm": 0.0},
            {"seq": 2, "ts": ts, "tilt_deg": 0.5, "displacement_mm": 0.0, "battery_v": 9.0},
        ],
    }
    token = {"token": TOKENS["gw"]}
    async with client(service) as http:
        outside = await http.post("/ingest/v1/lan", params=token, json=batch)
        assert outside.status_code == 403
        unknown = await http.post("/ingest/v1/nope", params=token, json=batch)
        assert unknown.status_code == 404
        lorawan = await http.post("/ingest/v1/lora", params=token, json=batch)
        assert (lorawan.status_code, lorawan.text) == (404, "this source does not push over HTTP")
        answer = await http.post("/ingest/v1/gw", params=token, json=batch)
        assert answer.status_code == 200, answer.text
        metrics = (await http.get("/metrics")).text
    [point] = influx_server.points(influx_db)  # the second is out of range: dead-lettered
    assert (point["device_id"], point["seq"]) == (plan_pilot(4)[3].device_id, 1)
    assert 'smartcover_push_refused_total{reason="address",source="lan"} 1.0' in metrics
    assert 'smartcover_deadletters_total{reason="out_of_range"} 1.0' in metrics
