"""The API under test: a migrated database with units, covers, devices and a key per role,
the app served by a real uvicorn on a loopback port, clients per role, an alert engine.

Test modules use `running_api` inside their own fixtures (one database per test, on
SQLite and on PostgreSQL); this module holds no tests itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import CasePolicy, CoverInfo
from alerting.directory import StaticDirectory
from alerting.engine import AlertEngine, AlertMetrics, CoverContext
from alerting.models import CaseRow
from alerting.rules import CoverRule
from api.app import Readiness, create_app
from api.keys import create_key, revoke_key
from api.models import Role
from api.readings import ReadingBucket, ReadingPoint, ReadingQuery, ReadingWindow
from api.stream import OutboxSignal, StreamConfig
from core import db, registry
from core.contract import Reading
from core.outbound import OutboundPolicy
from core.registry_schemas import CoverCreate, DeviceCreate
from tests.db_fixtures import DRAINAGE, TOWNSHIP, WATER, add_units, migrated_sessions

T0 = 1_800_000_000_000  # 2027-01-15T08:00:00Z, a fixed "now"
ADMIN_KEY = "bootstrap-admin-key-0123456789abcdef"
ROAD = "Renmin Road"
# Covers: (number, owner, device); classes 01 water supply and 03 storm water.
WATER_COVER = "4112030101000001"
DRAIN_COVER = "4112030103000002"
DRAIN_COVER_2 = "4112030103000003"
COVERS = ((WATER_COVER, "WATER", "dev-1"), (DRAIN_COVER, "DRAIN", "dev-2"))
COVERS_ALL = (*COVERS, (DRAIN_COVER_2, "DRAIN", "dev-3"))
# Holders of the keys made for every test; crews work for WATER (and one for DRAIN).
HOLDERS = {
    "viewer": "Bureau viewer",
    "crew": "Li Lei (water crew)",
    "crew_drain": "Han Meimei (drainage crew)",
    "dispatcher": "Zhang Wei (dispatcher)",
    "admin": "Registry admin",
}


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class EmptyReadings:
    """A `ReadingQuery` with nothing stored, for tests that are not about readings."""

    async def points(self, window: ReadingWindow, *, limit: int) -> list[ReadingPoint]:
        return []

    async def buckets(self, window: ReadingWindow, *, every_s: int) -> list[ReadingBucket]:
        return []


EMPTY = EmptyReadings()


class QuietServer(uvicorn.Server):
    """uvicorn without signal handlers: pytest keeps its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_server(app: Any) -> QuietServer:
    # Port 0: the kernel picks one. (A socket bound here and handed to uvicorn instead
    # answers every request some 40 ms late.)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        ws="none",
        http="h11",
        timeout_graceful_shutdown=1,
    )
    return QuietServer(config)


async def base_url_once_started(server: QuietServer, serving: asyncio.Task[None]) -> str:
    """Waits until uvicorn listens (it has no event for that); returns its base URL."""
    while not server.started:
        if serving.done():
            serving.result()  # it could not start: raise why
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class RunningApi:
    url: str
    sessions: async_sessionmaker[AsyncSession]
    keys: dict[str, str]
    clock: Clock
    signal: OutboxSignal
    engine: AlertEngine
    revoked_key: str = ""
    _clients: dict[str | None, httpx.AsyncClient] = field(default_factory=dict)

    def client(self, who: str | None = None) -> httpx.AsyncClient:
        """A client with `who`'s key (a HOLDERS key or "bootstrap"), or without a key.

        Clients are kept: making one (its TLS context) costs more than a request."""
        if who not in self._clients:
            headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
            self._clients[who] = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)
        return self._clients[who]

    def reading(
        self,
        device: str,
        ts: int,
        *,
        tilt: float = 0.5,
        disp: float = 0.0,
        water: float = 40.0,
        battery: float = 3.6,
    ) -> None:
        """Evaluates one reading (the alert engine writes alerts, cases and the outbox)."""
        reading = Reading(device, ts % 2**32, ts, tilt, disp, water, battery)
        self.engine.evaluate(reading, self.clock.now)

    async def strike(self, device: str, **fields: float) -> int:
        """A displaced cover (or `fields`): returns the id of its newest case."""
        self.reading(device, self.clock.now, **(fields or {"disp": 35.0}))
        await self.engine.commit_pending()
        async with db.transaction(self.sessions, write=False) as session:
            cover = {d: c for c, _, d in COVERS_ALL}[device]
            case_id = await session.scalar(
                select(CaseRow.id).where(CaseRow.cover_id == cover).order_by(CaseRow.id.desc())
            )
        assert case_id is not None
        return case_id


def alert_engine(
    sessions: async_sessionmaker[AsyncSession], clock: Clock, on_commit: Callable[[], None]
) -> AlertEngine:
    return AlertEngine(
        sessions=sessions,
        directory=directory(),
        policy=CasePolicy(),
        metrics=AlertMetrics(CollectorRegistry()),
        clock_ms=clock,
        on_commit=on_commit,
    )


def directory() -> StaticDirectory:
    return StaticDirectory(
        [
            (device, CoverContext(CoverInfo(cover, unit, ROAD), CoverRule(depth_cm=200), 60))
            for cover, unit, device in COVERS_ALL
        ]
    )


async def seed_registry(sessions: async_sessionmaker[AsyncSession]) -> None:
    await add_units(sessions, WATER, DRAINAGE, TOWNSHIP)
    async with db.transaction(sessions) as session:
        for cover, owner, device in COVERS_ALL:
            await registry.create_cover(
                session=session,
                cover=CoverCreate(
                    cover_id=cover, owner_unit=owner, road=ROAD, lon=112.45, lat=34.62
                ),
            )
            await registry.create_device(
                session=session, device=DeviceCreate(device_id=device, report_interval_s=60)
            )
            await registry.bind_device(session=session, device_id=device, cover_id=cover)


async def make_keys(sessions: async_sessionmaker[AsyncSession]) -> tuple[dict[str, str], str]:
    """A key per role (crews: WATER, and DRAIN as `crew_drain`), and a revoked one."""
    keys: dict[str, str] = {}
    async with db.transaction(sessions) as session:
        for who, holder in HOLDERS.items():
            role = Role.CREW if who.startswith("crew") else Role(who)
            unit = {"crew": "WATER", "crew_drain": "DRAIN"}.get(who)
            _, keys[who] = await create_key(session=session, role=role, name=holder, unit_code=unit)
        revoked, revoked_key = await create_key(session=session, role=Role.ADMIN, name="gone")
        await revoke_key(session=session, key_id=revoked.id)
    keys["bootstrap"] = ADMIN_KEY
    return keys, revoked_key


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serves `app` with uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn_server(app)
    serving = asyncio.create_task(server.serve())
    try:
        yield await base_url_once_started(server, serving)
    finally:
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def running_api(
    database_url: str,
    *,
    readings: ReadingQuery | None = EMPTY,
    stream: StreamConfig | None = None,
    seed: bool = True,
    outbound: OutboundPolicy | None = None,
) -> AsyncIterator[RunningApi]:
    """The whole API on a fresh database, served; clients closed at the end.

    `readings` None: no time-series store at all. `outbound`: create_app's."""
    async with migrated_sessions(database_url) as sessions:
        if seed:
            await seed_registry(sessions)
        keys, revoked = await make_keys(sessions)
        clock = Clock()
        signal = OutboxSignal()
        app = create_app(
            registry=CollectorRegistry(),
            readiness=lambda: Readiness({"database": None}),
            sessions=sessions,
            readings=readings,
            admin_key=ADMIN_KEY,
            outbox_signal=signal,
            stream_config=stream or StreamConfig(poll_s=0.05, keepalive_s=0.5),
            clock_ms=clock,
            outbound=outbound,
        )
        # The engine notifies the live stream through its in-process hook.
        engine = alert_engine(sessions, clock, on_commit=signal.notify)
        api = RunningApi("", sessions, keys, clock, signal, engine, revoked)
        try:
            async with serve(app) as url:
                api.url = url
                yield api
                signal.close()  # ends open streams, so that uvicorn can stop
        finally:
            for client in api._clients.values():
                await client.aclose()
