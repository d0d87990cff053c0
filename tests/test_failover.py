"""Active/standby on one PostgreSQL (core.leadership): the holder of the advisory lock
consumes; the other serves the API and takes over when the active dies or loses its
database. Real PostgreSQL, Mosquitto and influxd; `smartcover serve` as processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.models import AlertRow, CaseEventRow, CaseRow
from core.db import create_engine, session_factory, transaction, upgrade
from core.settings import Settings
from smartcover.runtime import Service, build_service, run_service
from smartcover.seed import LOW_LYING_ROAD, SeededCover, plan_pilot, seed_pilot
from smartcover.serve import api_server, serve_api
from tests.harness import (
    ServiceProcess,
    SteadyPublisher,
    kill_hard,
    reading,
    service_env,
    serving_in_process,
    settings_of,
    wait_until,
)
from tests.servers import InfluxServer, MosquittoServer, PostgresServer, free_port

pytestmark = pytest.mark.asyncio
ADMIN_KEY = "an-admin-key-for-the-failover-test"


def _role(base_url: str) -> str | None:
    try:
        answer = httpx.get(f"{base_url}/readyz", timeout=1)
    except httpx.HTTPError:
        return None
    role = answer.json().get("role") if answer.status_code == 200 else None
    return str(role) if role else None


async def _wait_role(base_url: str, role: str, timeout_s: float) -> None:
    await wait_until(
        lambda: _role(base_url) == role, timeout_s=timeout_s, what=f"{base_url} to be {role}"
    )


def _storm(covers: list[SeededCover], start_ms: int) -> list[tuple[str, bytes]]:
    """Thirty readings per well, one a second, the water rising past the limit."""
    messages = []
    for seq in range(30):
        for cover in covers:
            body = {
                "device_id": cover.device_id,
                "seq": seq,
                "ts": start_ms + seq * 1000,
                "tilt_deg": 0.5,
                "displacement_mm": 0.0,
                "water_level_cm": 20.0 + seq * 8,
            }
            messages.append((f"covers/{cover.device_id}/telemetry", json.dumps(body).encode()))
    return messages


@pytest.mark.slow
async def test_the_standby_takes_over_after_kill_9_losing_and_doubling_nothing(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    name = f"failover_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    database_url = postgres_server.url(name)
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    await seed_pilot(sessions, plan_pilot(24))
    flooded = [c for c in plan_pilot(24) if c.road == LOW_LYING_ROAD]
    nodes: list[tuple[ServiceProcess, str]] = []
    for node in ("a", "b"):
        env = service_env(
            mosquitto,
            influx_server,
            influx_db,
            tmp_path / node,
            SMARTCOVER_DATABASE_URL=database_url,
            SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
        )
        (tmp_path / node).mkdir()
        process = ServiceProcess(env, tmp_path / f"{node}.log")
        nodes.append((process, f"http://127.0.0.1:{env['SMARTCOVER_API_PORT']}"))
    (first, first_url), (second, second_url) = nodes
    messages = _storm(flooded, time.time_ns() // 1_000_000 - 120_000)
    first.start()
    try:
        await _wait_role(first_url, "active", 30)
        second.start()
        await _wait_role(second_url, "standby", 30)  # ready: it serves the API
        publisher = SteadyPublisher(mosquitto.url, "storm")
        publishing = asyncio.create_task(publisher.publish_all(messages, rate_per_s=100))
        await wait_until(lambda: publisher.sent >= len(messages) // 2, timeout_s=30)
        kill_hard(first)  # mid-storm
        await _wait_role(second_url, "active", 20)
        await publishing
        await wait_until(
            lambda: influx_server.count(influx_db) >= len(messages),
            timeout_s=60,
            what="every reading stored",
        )
        await asyncio.sleep(1.0)  # the last batch's commit
        assert "now active" in second.log()
    finally:
        if second.proc is not None and second.proc.poll() is None:
            second.signal(signal.SIGTERM)
            second.wait(20)
        second.close()
        first.close()
    async with transaction(sessions, write=False) as session:
        alerts = list(await session.scalars(select(AlertRow)))
        cases = list(await session.scalars(select(CaseRow)))
    await engine.dispose()
    # Every flooded well alerted once and has one case: none missed, none doubled.
    assert sorted(a.cover_id for a in alerts) == sorted(c.cover_id for c in flooded)
    assert sorted(c.cover_id for c in cases) == sorted(c.cover_id for c in flooded)
    assert len({c.incident_id for c in cases}) == 1


async def test_an_active_that_loses_its_database_stops_consuming_and_comes_back(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    private_postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    postgres = private_postgres
    postgres.create_database("smartcover")
    database_url = postgres.url("smartcover")
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_DATABASE_URL=database_url,
        SMARTCOVER_API_PORT=str(free_port()),
    )
    async with serving_in_process(env) as service:
        await wait_until(lambda: service.leadership.role == "active", timeout_s=10, what="active")
        postgres.stop()
        await wait_until(
            lambda: (
                service.leadership.role == "standby" and not service.ingest.service.broker_connected
            ),
            timeout_s=15,
            what="the active to stop consuming",
        )
        # Queued by the broker in the persistent session while nobody consumes.
        await SteadyPublisher(mosquitto.url, "dev").publish_all(
            [("covers/dev-1/telemetry", json.dumps(reading("dev-1", 1, _now_ms())).encode())],
            rate_per_s=100,
        )
        postgres.start()
        await wait_until(
            lambda: service.leadership.role == "active" and service.ingest.service.broker_connected,
            timeout_s=30,
            what="the process to be active again",
        )
        await wait_until(
            lambda: influx_server.count(influx_db) == 1,
            timeout_s=20,
            what="the reading published while the database was down",
        )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.asynccontextmanager
async def _node(settings: Settings) -> AsyncIterator[Service]:
    """`smartcover serve` in this event loop, whatever its role; stopped at the end."""
    built = await build_service(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service(built, stop, api=serve_api(api_server(built), stop)))
    try:
        yield built
    finally:
        stop.set()
        await task


async def _escalations(sessions: async_sessionmaker[AsyncSession]) -> list[str]:
    async with transaction(sessions, write=False) as session:
        notes = await session.scalars(
            select(CaseEventRow.note).where(CaseEventRow.action == "escalate")
        )
        return sorted(notes)


async def _only_case(sessions: async_sessionmaker[AsyncSession]) -> int | None:
    async with transaction(sessions, write=False) as session:
        return await session.scalar(select(CaseRow.id))


async def test_timers_see_a_transition_made_through_the_standby_and_fire_once(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    postgres_server: PostgresServer,
    tmp_path: Path,
) -> None:
    name = f"timers_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    database_url = postgres_server.url(name)
    engine = create_engine(database_url)
    await upgrade(engine)
    sessions = session_factory(engine)
    device = plan_pilot(12)[0].device_id
    await seed_pilot(sessions, plan_pilot(12))
    # Acknowledgement due after 6 s, on site after 9 s: short enough to watch both pass.
    deadlines = {"critical": {"acknowledged": 0.1, "on_site": 0.15, "resolved": 600}}
    nodes = [
        settings_of(
            service_env(
                mosquitto,
                influx_server,
                influx_db,
                tmp_path / node,
                SMARTCOVER_DATABASE_URL=database_url,
                SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
            )
        ).model_copy(update={"case_deadlines_min": deadlines})
        for node in ("a", "b")
    ]
    async with contextlib.AsyncExitStack() as second_stack:
        async with _node(nodes[0]) as first:
            await wait_until(lambda: first.ingest.service.broker_connected, timeout_s=15)
            second = await second_stack.enter_async_context(_node(nodes[1]))
            await wait_until(lambda: second.leadership.role == "standby", timeout_s=15)
            displaced = reading(device, 1, _now_ms(), displacement_mm=45.0)
            await SteadyPublisher(mosquitto.url, "dev").publish_all(
                [(f"covers/{device}/telemetry", json.dumps(displaced).encode())], rate_per_s=100
            )
            case_id: list[int | None] = [None]

            async def opened() -> bool:
                case_id[0] = await _only_case(sessions)
                return case_id[0] is not None

            await _wait_async(opened, timeout_s=15, what="the case")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{nodes[1].api_port}",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as standby_api:
                answer = await standby_api.post(
                    f"/api/v1/cases/{case_id[0]}/transitions",
                    json={"to": "acknowledged", "note": "on our way"},
                )
            assert answer.status_code == 200, answer.text

            # The active's timers pass both deadlines; only on-site was missed.
            async def escalated() -> bool:
                return bool(await _escalations(sessions))

            await _wait_async(escalated, timeout_s=20, what="the on-site escalation")
            assert await _escalations(sessions) == ["on_site deadline missed"]
        # The first node stopped: the second takes over the timers and fires none again.
        await wait_until(lambda: second.leadership.role == "active", timeout_s=15)
        await asyncio.sleep(3)  # three timer ticks
        assert await _escalations(sessions) == ["on_site deadline missed"]
    await engine.dispose()


async def _wait_async(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.2)
