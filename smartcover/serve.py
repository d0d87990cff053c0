"""Runs the service (ingest, alerting, notifications and the HTTP API) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.app import Readiness, create_app
from api.heavy import heavy_limits
from api.limits import api_limits
from api.readings import InfluxReadingQuery, ReadingQuery
from api.readings_sqlite import SqliteReadingQuery
from core.db import create_engine, session_factory, upgrade
from core.looplag import LoopLag
from core.outbound import OutboundPolicy
from core.settings import Settings
from core.timeseries import InfluxStore, ReadingStore
from core.timeseries_sqlite import SqliteReadingStore
from ingest.bootstrap import build_store
from ingest.push.handler import PushIngress
from smartcover.runtime import Service, build_service, case_policy, run_service

logger = logging.getLogger(__name__)

# At shutdown, how long open requests may take to finish before their connections are
# closed: a live-stream client that stopped reading (a phone out of coverage) would
# otherwise hold the process up for as long as its connection lives.
API_SHUTDOWN_GRACE_S = 5


class ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: our stop event decides when it ends."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def reading_query(store: ReadingStore) -> ReadingQuery | None:
    if isinstance(store, InfluxStore):
        return InfluxReadingQuery(store)
    if isinstance(store, SqliteReadingStore):
        return SqliteReadingQuery(store)
    return None


def api_server(service: Service, *, full: bool = True) -> ApiServer:
    """The API of a running service; `full=False`: only /healthz, /readyz and /metrics."""
    settings = service.settings
    if not full:
        app = create_app(registry=service.metrics_registry, readiness=service.readiness)
        return _uvicorn(app, settings)
    app = create_app(
        registry=service.metrics_registry,
        readiness=service.readiness,
        sessions=service.sessions,
        readings=reading_query(service.ingest.store),
        admin_key=settings.admin_key,
        limits=api_limits(settings),
        case_policy=case_policy(settings),
        outbox_signal=service.outbox_signal,
        registry_changed=service.cache.apply,
        heavy_limits=heavy_limits(settings),
        outbound=OutboundPolicy.from_settings(settings),
        push=PushIngress.from_service(service),
    )
    return _uvicorn(app, settings)


def _uvicorn(app: FastAPI, settings: Settings) -> ApiServer:
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=API_SHUTDOWN_GRACE_S,
    )
    return ApiServer(config)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def serve_api_only(settings: Settings) -> None:
    """`smartcover api`: the HTTP API on the stores, without MQTT (to scale the API out).

    Live streams poll the outbox, as events come from the process that evaluates.
    """
    stop = asyncio.Event()
    _stop_on_signals(stop)
    db = create_engine(settings.database_url)
    await upgrade(db)
    store = build_store(settings)

    def readiness() -> Readiness:
        return Readiness({"database": None})

    metrics = CollectorRegistry()
    app = create_app(
        registry=metrics,
        readiness=readiness,
        sessions=session_factory(db),
        readings=reading_query(store),
        admin_key=settings.admin_key,
        limits=api_limits(settings),
        case_policy=case_policy(settings),
        heavy_limits=heavy_limits(settings),
        outbound=OutboundPolicy.from_settings(settings),
    )
    try:
        logger.info("API on http://%s:%d", settings.api_host, settings.api_port)
        async with asyncio.TaskGroup() as group:
            lag = group.create_task(LoopLag(metrics).run())
            await serve_api(_uvicorn(app, settings), stop)
            lag.cancel()
    finally:
        await store.close()
        await db.dispose()


async def serve_api(server: ApiServer, stop: asyncio.Event) -> None:
    task = asyncio.ensure_future(server.serve())
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        await task


async def serve(settings: Settings, *, full_api: bool = True) -> None:
    """`smartcover serve` (full_api) or `smartcover ingest` (operations endpoints only)."""
    stop = asyncio.Event()
    _stop_on_signals(stop)
    service = await build_service(settings)
    logger.info("API on http://%s:%d", settings.api_host, settings.api_port)
    await run_service(service, stop, api=serve_api(api_server(service, full=full_api), stop))
