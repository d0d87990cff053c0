"""Wires the parts into one running service: ingest, alerting, notifications and the API.

Start-up in order: relational store migrated, registry loaded, alert state loaded, then
the tasks. Shutdown in the reverse order of dependency: intake stops and drains (each
batch acknowledged once stored and evaluated), the engine commits its last changes and
device progress, then notifier, dispatcher and API stop, and the stores close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from alerting.cases import MINUTE_MS, CasePolicy
from alerting.dispatcher import DispatchOptions, OutboxDispatcher
from alerting.engine import AlertEngine, AlertMetrics
from alerting.notifiers import MqttNotifier, Notifier, WebhookNotifier
from alerting.outbox import MQTT_CHANNEL, WEBHOOK_CHANNEL
from alerting.registry_directory import RegistryContacts, RegistryDirectory
from alerting.rules import Thresholds
from api.app import Readiness
from api.stream import OutboxSignal
from core.clock import wall_clock_ms
from core.db import create_engine, session_factory, upgrade
from core.leadership import Leadership, LeadershipMetrics, Role
from core.looplag import LoopLag
from core.outbound import OutboundPolicy
from core.registry_cache import RegistryCache
from core.registry_notify import follow_registry
from core.retention import keep_retention
from core.settings import Settings
from core.unregistered import UnregisteredLog
from ingest.bootstrap import IngestParts, build_ingest

logger = logging.getLogger(__name__)


def case_policy(settings: Settings) -> CasePolicy:
    deadlines: dict[str, dict[str, int]] = {
        severity: {milestone: round(minutes * MINUTE_MS) for milestone, minutes in due.items()}
        for severity, due in settings.case_deadlines_min.items()
    }
    return CasePolicy(
        deadlines=deadlines,
        renotify_every_ms=round(settings.renotify_every_s * 1000),
        verify_window_ms=round(settings.verify_window_s * 1000),
        verify_min_readings=settings.verify_min_readings,
    )


@dataclass
class Service:
    """Everything one `smartcover serve` process runs."""

    settings: Settings
    metrics_registry: CollectorRegistry
    db: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    cache: RegistryCache
    unregistered: UnregisteredLog
    directory: RegistryDirectory
    engine: AlertEngine
    dispatcher: OutboxDispatcher
    mqtt_notifier: MqttNotifier
    ingest: IngestParts
    outbox_signal: OutboxSignal
    leadership: Leadership
    db_problem: str | None = None

    def readiness(self) -> Readiness:
        health = self.ingest.writer.health
        store_problem = None
        if health.auth_failed:
            store_problem = f"credentials refused: {health.last_error}"
        elif health.down:
            store_problem = f"unreachable (spooling): {health.last_error}"
        broker = None if self.ingest.service.broker_connected else "not connected"
        if self.leadership.role is Role.STANDBY:
            broker = None  # a standby serves the API and does not consume: that is ready
        registry = None if self.cache.loaded else "registry not loaded"
        return Readiness(
            {
                "broker": broker,
                "timeseries": store_problem,
                "database": self.db_problem or registry,
            },
            role=self.leadership.role.value,
        )


async def build_service(settings: Settings) -> Service:
    """Opens the stores and loads the state; nothing runs yet."""
    metrics_registry = CollectorRegistry()
    db = create_engine(settings.database_url)
    await upgrade(db)
    sessions = session_factory(db)
    cache = RegistryCache(sessions)
    await cache.refresh()
    defaults = Thresholds(tilt_confirm_ms=round(settings.tilt_confirm_s * 1000))
    unregistered = UnregisteredLog(sessions, is_registered=lambda d: cache.lookup(d) is not None)
    directory = RegistryDirectory(cache, defaults, unregistered)
    endpoint = settings.mqtt
    mqtt_notifier = MqttNotifier(
        endpoint, client_id=f"{settings.mqtt_client_id}-notify", protocol=settings.mqtt_protocol
    )
    notifiers: dict[str, Notifier] = {
        MQTT_CHANNEL: mqtt_notifier,
        WEBHOOK_CHANNEL: WebhookNotifier(
            RegistryContacts(sessions), outbound=OutboundPolicy.from_settings(settings)
        ),
    }
    dispatcher = OutboxDispatcher(
        sessions,
        notifiers,
        registry=metrics_registry,
        options=DispatchOptions.from_settings(settings),
    )
    outbox_signal = OutboxSignal()

    def committed() -> None:  # new outbox rows: deliver them, and tell the live streams
        dispatcher.wake()
        outbox_signal.notify()

    engine = AlertEngine(
        sessions=sessions,
        directory=directory,
        policy=case_policy(settings),
        metrics=AlertMetrics(metrics_registry),
        clock_ms=wall_clock_ms,
        on_commit=committed,
    )

    def cover_of(device_id: str) -> str | None:
        binding = cache.lookup(device_id)
        return binding.cover_id if binding is not None else None

    ingest = build_ingest(settings, metrics_registry, evaluator=engine, cover_of=cover_of)
    logger.info("registry: %d covers, %d devices", len(cache), cache.device_count)
    return Service(
        settings,
        metrics_registry,
        db,
        sessions,
        cache,
        unregistered,
        directory,
        engine,
        dispatcher,
        mqtt_notifier,
        ingest,
        outbox_signal,
        Leadership(db, settings.mqtt_client_id, LeadershipMetrics(metrics_registry)),
    )


async def _watch_database(service: Service) -> None:
    """Keeps /readyz honest about the relational store."""
    while True:
        try:
            async with service.db.connect() as connection:
                await connection.execute(text("SELECT 1"))
            service.db_problem = None
        except Exception as exc:  # any failure to reach it is what /readyz must show
            service.db_problem = f"unreachable: {type(exc).__name__}"
        await asyncio.sleep(5)


async def run_service(
    service: Service,
    stop: asyncio.Event,
    extra: list[Coroutine[Any, Any, None]] | None = None,
    *,
    api: Coroutine[Any, Any, None] | None = None,
) -> None:
    """Runs until `stop` is set, then shuts down in order and closes the stores.

    The API and the registry run throughout; consuming, evaluating, timers and outbox only
    while this process is active (`core.leadership`). `extra` jobs run until cancelled at
    shutdown; `api` ends by itself once `stop` is set and the live streams are closed, and
    is awaited so that it closes its sockets.
    """
    background = [
        follow_registry(service.cache, service.db, stop),
        _watch_database(service),
        # Policies the time-series store applies itself: idempotent on either role.
        keep_retention(service.ingest.store, service.metrics_registry),
        LoopLag(service.metrics_registry).run(),  # ingest, alerts and API share the loop
        *(extra or []),
    ]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_done_when_cancelled(job)) for job in background]
            api_task = group.create_task(api) if api is not None else None
            try:
                await _serve_while_active(service, stop)
            finally:
                await service.leadership.release()
            service.outbox_signal.close()  # live streams end, so the API can stop
            if api_task is not None:
                await api_task
            for task in tasks:
                task.cancel()
    finally:
        await service.ingest.store.close()
        await service.db.dispose()


async def _serve_while_active(service: Service, stop: asyncio.Event) -> None:
    """Each time this process becomes active: one term of consuming, until stop or loss."""
    while await service.leadership.acquire(stop):
        # What the previous active committed meanwhile; what this process remembers from
        # an earlier term is stale.
        await service.engine.load()
        lost = await _active_term(service, stop)
        if lost is None:
            return
        logger.warning("stopped consuming (%s); waiting to become active again", lost)


async def _active_term(service: Service, stop: asyncio.Event) -> str | None:
    """Consumes until `stop` (a clean shutdown: None) or until the role is lost (why)."""
    term_stop = asyncio.Event()
    lost: list[str] = []

    async def watch_role() -> None:
        lost.append(await service.leadership.watch())
        service.ingest.service.abandon()  # it can no longer commit: stop taking at once
        term_stop.set()

    async def watch_stop() -> None:
        await stop.wait()
        term_stop.set()

    duties = [
        watch_role(),
        watch_stop(),
        service.unregistered.run(),
        service.engine.run(),
        service.mqtt_notifier.run(),
        service.dispatcher.run(),
    ]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_done_when_cancelled(job)) for job in duties]
        await service.ingest.service.run(term_stop)
        if not lost:
            await service.engine.close()
            await service.unregistered.flush()
        for task in tasks:
            task.cancel()
    return lost[0] if lost else None


async def _done_when_cancelled(job: Awaitable[None]) -> None:
    # A background job that was cancelled at shutdown is done, not failed.
    with contextlib.suppress(asyncio.CancelledError):
        await job
