"""The whole service on real servers: a reading published over MQTT becomes a case and a
signed webhook for the cover's owner unit; a lorry's spike does not."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from alerting.models import AlertRow, CaseRow
from alerting.notifiers import verify_signature
from core import registry
from core.db import create_engine, session_factory, transaction, upgrade
from core.registry_schemas import UnitUpdate
from core.settings import MqttEndpoint
from ingest import mqtt
from smartcover.runtime import Service
from smartcover.seed import LOW_LYING_ROAD, SeededCover, plan_pilot, seed_pilot
from tests.harness import (
    ServiceProcess,
    SteadyPublisher,
    kill_hard,
    service_env,
    serving_in_process,
    wait_until,
)
from tests.servers import InfluxServer, MosquittoServer

pytestmark = pytest.mark.asyncio
ADMIN_KEY = "an-admin-key-for-this-test-only"
SECRET = "demo-secret"  # noqa: S105 -- the seed's public demo secret


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class WebhookReceiver:
    url: str
    received: list[Received] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            receiver.received.append(Received(body, dict(self.headers.items())))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture
async def service(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
    webhook: WebhookReceiver,
) -> AsyncIterator[Service]:
    database_url = f"sqlite:///{tmp_path / 'smartcover.db'}"
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    await seed_pilot(sessions, plan_pilot(12))
    async with transaction(sessions) as session:
        for code in ("DR-CITY", "WS-CITY"):
            await registry.update_unit(
                session=session, code=code, update=UnitUpdate(webhook_url=webhook.url)
            )
    await engine.dispose()
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_DATABASE_URL=database_url,
        SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
        SMARTCOVER_OUTBOUND_ALLOW_NETS="127.0.0.0/8",  # the webhook receiver's
    )
    async with serving_in_process(env) as built:
        yield built


async def publish(url: str, readings: list[dict[str, object]]) -> None:
    options = mqtt.SessionOptions("test-device", clean_start=True)
    async with mqtt.connect(MqttEndpoint.parse(url), options, lambda _: None) as connection:
        for reading in readings:
            topic = f"covers/{reading['device_id']}/telemetry"
            await connection.publish(topic, json.dumps(reading).encode(), qos=1)


def reading(device: str, seq: int, **values: float) -> dict[str, object]:
    # One reading a second, the newest now: the rules order readings by their time.
    ts = time.time_ns() // 1_000_000 - (10 - seq) * 1000
    return {
        "device_id": device,
        "seq": seq,
        "ts": ts,
        "tilt_deg": 0.5,
        "displacement_mm": 0.0,
        "water_level_cm": 20.0,
        **values,
    }


async def cases(service: Service) -> list[CaseRow]:
    async with transaction(service.sessions, write=False) as session:
        return list(await session.scalars(select(CaseRow)))


async def test_displaced_cover_becomes_a_case_and_a_signed_webhook(
    service: Service,
    mosquitto: MosquittoServer,
    webhook: WebhookReceiver,
) -> None:
    cover = plan_pilot(12)[0]
    await publish(
        mosquitto.url,
        [reading(cover.device_id, 0), reading(cover.device_id, 1, displacement_mm=42.0)],
    )
    await wait_until(lambda: len(webhook.received) >= 2, timeout_s=15, what="webhooks")
    [case] = await cases(service)
    assert (case.cover_id, case.unit_code, case.severity, case.status) == (
        cover.cover_id,
        cover.owner_unit,
        "critical",
        "dispatched",
    )
    await wait_until(
        lambda: (
            {json.loads(r.body)["type"] for r in webhook.received}
            >= {"alert.raised", "case.opened"}
        ),
        timeout_s=15,
        what="alert and case webhooks",
    )
    for delivery in webhook.received:
        assert verify_signature(
            SECRET, delivery.headers["X-Smartcover-Signature"], delivery.body, now=time.time()
        )
        assert delivery.headers["X-Smartcover-Event-Id"] == json.loads(delivery.body)["event_id"]
    async with transaction(service.sessions, write=False) as session:
        alert = await session.scalar(select(AlertRow))
    assert alert is not None
    assert alert.received_ms is not None
    assert alert.committed_ms is not None
    await wait_until(lambda: service.dispatcher.delivered >= 2, timeout_s=10)
    async with transaction(service.sessions, write=False) as session:
        alert = await session.scalar(select(AlertRow))
    assert alert is not None
    assert alert.notified_ms is not None
    assert alert.raised_ms <= alert.received_ms <= alert.committed_ms <= alert.notified_ms
    # The same figures on the API, and the delivery state per channel.
    base = f"http://127.0.0.1:{service.settings.api_port}"
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as client:
        alerts = (await client.get("/api/v1/alerts", params={"cover_id": cover.cover_id})).json()
        deliveries = (await client.get("/api/v1/notifications")).json()
    [listed] = alerts["items"]
    assert listed["notified_ms"] == alert.notified_ms
    assert listed["committed_ms"] == alert.committed_ms
    assert deliveries["channels"]["webhook"]["delivered"] >= 2
    assert deliveries["failing"] == []


async def test_a_passing_lorry_causes_no_case(
    service: Service,
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
) -> None:
    device = plan_pilot(12)[1].device_id
    await publish(
        mosquitto.url, [reading(device, 0), reading(device, 1, tilt_deg=28.0), reading(device, 2)]
    )
    await wait_until(lambda: influx_server.count(influx_db) >= 3, timeout_s=10, what="stored")
    await asyncio.sleep(0.5)
    assert await cases(service) == []
    [point] = [p for p in influx_server.points(influx_db) if p["seq"] == 1]
    assert point["cover_id"] == plan_pilot(12)[1].cover_id  # tagged from the registry


def storm(covers: list[SeededCover], start_ms: int) -> list[tuple[str, bytes]]:
    """Water rising one centimetre a reading in every well until it overflows."""
    messages = []
    for step_no in range(40):
        for cover in covers:
            level = cover.depth_cm - 60 + step_no * 2  # crosses depth − 30 at step 15
            body = {
                "device_id": cover.device_id,
                "seq": step_no,
                "ts": start_ms + step_no * 1000,
                "tilt_deg": 0.4,
                "displacement_mm": 0.0,
                "water_level_cm": level,
            }
            messages.append((f"covers/{cover.device_id}/telemetry", json.dumps(body).encode()))
    return messages


@pytest.mark.slow
async def test_kill_9_during_a_storm_loses_and_doubles_nothing(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
) -> None:
    database_url = f"sqlite:///{tmp_path / 'smartcover.db'}"
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    flooded = [c for c in plan_pilot(24) if c.road == LOW_LYING_ROAD]
    await seed_pilot(sessions, plan_pilot(24))
    env = service_env(
        mosquitto, influx_server, influx_db, tmp_path, SMARTCOVER_DATABASE_URL=database_url
    )
    service = ServiceProcess(env, tmp_path / "service.log")
    messages = storm(flooded, time.time_ns() // 1_000_000 - 120_000)
    service.start()
    try:
        await wait_until(lambda: "MQTT connected" in service.log(), timeout_s=20)
        publisher = SteadyPublisher(mosquitto.url, "storm")
        publishing = asyncio.create_task(publisher.publish_all(messages, rate_per_s=100))
        await wait_until(lambda: publisher.sent >= len(messages) // 2, timeout_s=30)
        kill_hard(service)  # mid-storm: some wells overflowed, some not yet
        service.start()
        await publishing
        try:
            await wait_until(
                lambda: influx_server.count(influx_db) >= len(messages),
                timeout_s=60,
                what="every reading stored",
            )
        except AssertionError:
            stored = {(p["device_id"], p["seq"]) for p in influx_server.points(influx_db)}
            sent = {
                (json.loads(body)["device_id"], json.loads(body)["seq"]) for _, body in messages
            }
            raise AssertionError(f"never stored: {sorted(sent - stored)}") from None
        await asyncio.sleep(1.0)  # the last batch's commit
    finally:
        service.signal(signal.SIGTERM)
        service.wait(20)
        service.close()
    async with transaction(sessions, write=False) as session:
        alerts = list(await session.scalars(select(AlertRow)))
        cases = list(await session.scalars(select(CaseRow)))
    await engine.dispose()
    assert sorted(a.cover_id for a in alerts) == sorted(c.cover_id for c in flooded)
    assert {a.kind for a in alerts} == {"water_high"}
    assert sorted(c.cover_id for c in cases) == sorted(c.cover_id for c in flooded)
    assert len({c.incident_id for c in cases}) == 1  # one flood on one road
    assert cases[0].incident_id is not None


async def test_live_stream_carries_the_alert_of_a_published_reading(
    service: Service, mosquitto: MosquittoServer
) -> None:
    cover = plan_pilot(12)[2]
    base = f"http://127.0.0.1:{service.settings.api_port}"
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    events: list[dict[str, object]] = []

    async def listen() -> None:
        async with (
            httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client,
            client.stream("GET", "/api/v1/stream") as answer,
        ):
            assert answer.status_code == 200
            async for line in answer.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line.removeprefix("data:")))
                    if events[-1]["type"] == "alert.raised":
                        return

    listening = asyncio.create_task(listen())
    await asyncio.sleep(0.5)  # the stream is open before the reading is published
    await publish(mosquitto.url, [reading(cover.device_id, 0, tilt_deg=70.0)])
    async with asyncio.timeout(15):
        await listening
    raised = events[-1]
    assert raised["unit_code"] == cover.owner_unit
    alert = raised["alert"]
    assert isinstance(alert, dict)
    assert (alert["cover_id"], alert["kind"]) == (cover.cover_id, "cover_open")
