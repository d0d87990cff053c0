"""Runs ingest and the HTTP API in one event loop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn
from prometheus_client import CollectorRegistry

from api.app import Readiness, create_app
from core.settings import Settings
from ingest.bootstrap import IngestParts, build_ingest

logger = logging.getLogger(__name__)


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: our stop event decides when it ends."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def _readiness(parts: IngestParts) -> Readiness:
    health = parts.writer.health
    store_problem = None
    if health.auth_failed:
        store_problem = f"credentials refused: {health.last_error}"
    elif health.down:
        store_problem = f"unreachable (spooling): {health.last_error}"
    broker_problem = None if parts.service.broker_connected else "not connected"
    return Readiness({"broker": broker_problem, "timeseries": store_problem})


async def serve(settings: Settings, *, with_api: bool = True) -> None:
    registry = CollectorRegistry()
    parts = build_ingest(settings, registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    api = None
    if with_api:
        app = create_app(registry=registry, readiness=lambda: _readiness(parts))
        api = _ApiServer(
            uvicorn.Config(
                app,
                host=settings.api_host,
                port=settings.api_port,
                log_level="warning",
                lifespan="off",
            )
        )
    try:
        async with asyncio.TaskGroup() as group:
            if api is not None:
                group.create_task(api.serve(), name="api")
                logger.info("API on http://%s:%d", settings.api_host, settings.api_port)
            await parts.service.run(stop)
            if api is not None:
                api.should_exit = True
    finally:
        await parts.store.close()
