"""Builds the ingest pipeline from settings: store, spool, dead-letter log, writer, service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from core.clock import wall_clock_ms
from core.deadletters import DeadLetterLog
from core.settings import Settings
from core.timeseries import InfluxConfig, InfluxStore, ReadingStore
from core.timeseries_sqlite import SqliteReadingStore
from ingest.metrics import IngestMetrics
from ingest.service import IngestService, ReadingEvaluator
from ingest.spool import Spool
from ingest.writer import BatchWriter


class ConfigurationError(Exception):
    """The settings cannot run this part; the message says what to set."""


@dataclass
class IngestParts:
    store: ReadingStore
    writer: BatchWriter
    service: IngestService
    metrics: IngestMetrics


def deadletter_log(settings: Settings) -> DeadLetterLog:
    return DeadLetterLog(settings.spool_dir / "deadletters.jsonl", settings.deadletter_capacity)


def build_store(settings: Settings) -> ReadingStore:
    """InfluxDB when SMARTCOVER_INFLUX_URL is set, else the embedded SQLite store."""
    if not settings.influx_url:
        return SqliteReadingStore(
            settings.timeseries_path, raw_retention_days=settings.retention_raw_days
        )
    return InfluxStore(InfluxConfig.from_settings(settings))


def build_ingest(
    settings: Settings,
    registry: CollectorRegistry,
    *,
    evaluator: ReadingEvaluator | None = None,
    cover_of: Callable[[str], str | None] = lambda _: None,
) -> IngestParts:
    """The pipeline; `evaluator` (the alert engine) and `cover_of` (the registry) optional."""
    metrics = IngestMetrics(registry)
    store = build_store(settings)
    writer = BatchWriter(
        store=store,
        spool=Spool(settings.spool_dir / "readings", round(settings.spool_max_mb * 1024 * 1024)),
        dead_letters=deadletter_log(settings),
        metrics=metrics,
        deadline_s=settings.write_deadline_s,
        clock_ms=wall_clock_ms,
        cover_of=cover_of,
    )
    service = IngestService(settings=settings, writer=writer, metrics=metrics, evaluator=evaluator)
    return IngestParts(store=store, writer=writer, service=service, metrics=metrics)
