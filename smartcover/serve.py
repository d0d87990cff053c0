"""Runs the service (ingest, alerting, notifications and the HTTP API) until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator

import uvicorn

from api.app import create_app
from api.readings import InfluxReadingQuery, ReadingQuery
from api.readings_sqlite import SqliteReadingQuery
from core.settings import Settings
from core.timeseries import InfluxStore, ReadingStore
from core.timeseries_sqlite import SqliteReadingStore
from smartcover.runtime import Service, build_service, case_policy, run_service

logger = logging.getLogger(__name__)


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


def api_server(service: Service) -> ApiServer:
    settings = service.settings
    app = create_app(
        registry=service.metrics_registry,
        readiness=service.readiness,
        sessions=service.sessions,
        readings=reading_query(service.ingest.store),
        admin_key=settings.admin_key,
        case_policy=case_policy(settings),
        outbox_signal=service.outbox_signal,
    )
    config = uvicorn.Config(
        app, host=settings.api_host, port=settings.api_port, log_level="warning", lifespan="off"
    )
    return ApiServer(config)


async def serve_api(server: ApiServer, stop: asyncio.Event) -> None:
    task = asyncio.ensure_future(server.serve())
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        await task


async def serve(
    settings: Settings, *, with_api: bool = True, stop: asyncio.Event | None = None
) -> None:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = await build_service(settings)
    extra = []
    if with_api:
        extra.append(serve_api(api_server(service), stop))
        logger.info("API on http://%s:%d", settings.api_host, settings.api_port)
    await run_service(service, stop, extra)
