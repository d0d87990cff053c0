"""Prometheus metrics of the ingest pipeline, on a registry of their own (one per service)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.contract import Reason


@dataclass
class IngestTotals:
    """Plain counters for the shutdown summary and tests; mirrored into Prometheus."""

    received: int = 0
    stored: int = 0
    spooled: int = 0
    replayed: int = 0
    dead_lettered: int = 0
    acknowledged: int = 0
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.totals = IngestTotals()
        self.messages = Counter(
            "smartcover_ingest_messages",
            "Telemetry messages received from the broker",
            registry=registry,
        )
        self.stored = Counter(
            "smartcover_ingest_readings_stored",
            "Readings written to the time-series store",
            registry=registry,
        )
        self.spooled = Counter(
            "smartcover_ingest_readings_spooled",
            "Readings written to the local spool because the store was unreachable",
            registry=registry,
        )
        self.dead_letters = Counter(
            "smartcover_deadletters",
            "Messages or readings dead-lettered, by reason",
            ["reason"],
            registry=registry,
        )
        for reason in Reason:  # every reason is visible from the start, at zero
            self.dead_letters.labels(reason=reason.value)
        self.dead_letters_pruned = Counter(
            "smartcover_deadletters_pruned",
            "Dead letters removed from the log once older than the keep period",
            registry=registry,
        )
        self.foreign_messages = Counter(
            "smartcover_ingest_foreign_subscription_messages",
            "Messages delivered through a subscription the service did not make",
            registry=registry,
        )
        self.foreign_subscriptions_removed = Counter(
            "smartcover_ingest_foreign_subscriptions_removed",
            "Subscriptions the service did not make, removed from its MQTT session",
            registry=registry,
        )
        self.acknowledged = Counter(
            "smartcover_ingest_acknowledged",
            "Messages acknowledged to the broker",
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "smartcover_spool_bytes",
            "Bytes of readings waiting in the local spool",
            registry=registry,
        )
        self.spool_full = Gauge(
            "smartcover_spool_full",
            "1 while the spool is full and the store down: readings are not acknowledged",
            registry=registry,
        )
        self.spool_segments = Gauge(
            "smartcover_spool_segments", "Batches waiting in the local spool", registry=registry
        )
        self.broker_connected = Gauge(
            "smartcover_broker_connected", "1 while connected to the MQTT broker", registry=registry
        )
        self.store_up = Gauge(
            "smartcover_store_up",
            "1 when the last write to the time-series store succeeded",
            registry=registry,
        )
        self.batch_write_seconds = Histogram(
            "smartcover_ingest_batch_write_seconds",
            "Time to make one batch durable",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

    # Counted per batch, not per message: a Prometheus increment takes a lock.

    def count_received(self, messages: int) -> None:
        self.totals.received += messages
        self.messages.inc(messages)

    def count_stored(self, readings: int) -> None:
        self.totals.stored += readings
        self.stored.inc(readings)

    def count_spooled(self, readings: int) -> None:
        self.totals.spooled += readings
        self.spooled.inc(readings)

    def count_dead_letter(self, reason: str, amount: int = 1) -> None:
        self.totals.dead_lettered += amount
        by_reason = self.totals.dead_letters_by_reason
        by_reason[reason] = by_reason.get(reason, 0) + amount
        self.dead_letters.labels(reason=reason).inc(amount)

    def count_acknowledged(self, messages: int) -> None:
        self.totals.acknowledged += messages
        self.acknowledged.inc(messages)
