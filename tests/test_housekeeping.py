"""Bounded housekeeping: outbox pruning (SQLite, PostgreSQL), dead letters by age, a full
spool holding acknowledgement back (real Mosquitto and influxd)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.dispatcher import DispatchOptions, OutboxDispatcher
from alerting.models import DeliveryRow, OutboxRow
from alerting.outbox import PRUNE_LOCK_KEY, enqueue, prune_delivered
from core.db import transaction
from core.deadletters import DeadLetter
from ingest.bootstrap import deadletter_log
from tests.db_fixtures import BACKENDS, fresh_database_url, migrated_sessions
from tests.harness import (
    SteadyPublisher,
    reading,
    running_service,
    service_env,
    settings_of,
    wait_until,
)
from tests.servers import InfluxServer, MosquittoServer

HOUR_MS = 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- the spool ---------------------------------------------------------------------------

# About 300 readings: full after a few batches of 100.
SPOOL_MAX_MB = 0.05
READINGS = 2000


@pytest.mark.asyncio
async def test_full_spool_stops_acknowledging_and_loses_nothing(
    mosquitto: MosquittoServer,
    influx_server: InfluxServer,
    influx_db: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.writer")
    env = service_env(
        mosquitto,
        influx_server,
        influx_db,
        tmp_path,
        SMARTCOVER_SPOOL_MAX_MB=str(SPOOL_MAX_MB),
        SMARTCOVER_BATCH_SIZE="100",
        SMARTCOVER_MQTT_RECEIVE_MAXIMUM="200",
    )
    base = now_ms() - HOUR_MS
    messages = [
        (f"covers/full-{i % 10}/telemetry", json.dumps(reading(f"full-{i % 10}", i, base + i)))
        for i in range(READINGS)
    ]
    async with running_service(env) as parts:
        sample = parts.metrics.registry.get_sample_value
        influx_server.stop()
        try:
            publisher = SteadyPublisher(mosquitto.url, "full-pub")
            await publisher.publish_all(((t, p.encode()) for t, p in messages), rate_per_s=1000)
            await wait_until(
                lambda: sample("smartcover_spool_full") == 1, timeout_s=30, what="a full spool"
            )
            # Everything is with the broker; only what the spool took was acknowledged.
            totals = parts.metrics.totals
            assert totals.acknowledged == totals.spooled < READINGS
            assert (sample("smartcover_spool_bytes") or 0) <= SPOOL_MAX_MB * 1024 * 1024
        finally:
            influx_server.start()
        await wait_until(
            lambda: influx_server.count(influx_db) >= READINGS,
            timeout_s=60,
            interval_s=0.5,
            what="every reading after the store came back",
        )
        await wait_until(lambda: parts.writer.spool_empty, timeout_s=30, what="the spool to drain")
    assert influx_server.count(influx_db) == READINGS
    assert parts.metrics.totals.acknowledged == READINGS
    assert parts.metrics.registry.get_sample_value("smartcover_spool_full") == 0
    logged = [record.getMessage() for record in caplog.records]
    assert any(line.startswith("spool full") for line in logged)
    assert any(line.startswith("spool no longer full") for line in logged)


# -- the outbox --------------------------------------------------------------------------

DAY_MS = 24 * HOUR_MS
NOW_MS = 1_800_000_000_000
KEEP = DispatchOptions(keep_ms=30 * DAY_MS, prune_batch=1)  # one row a batch: many batches
OLD = NOW_MS - 40 * DAY_MS
RECENT = NOW_MS - DAY_MS

Sessions = async_sessionmaker[AsyncSession]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "housekeeping")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    async with migrated_sessions(database_url) as made:
        yield made


async def add_event(sessions: Sessions, occurred_ms: int, **delivered: int | None) -> int:
    """An event on the channels named, each delivered at the time given (None: pending)."""
    async with transaction(sessions) as session:
        row = await enqueue(
            session,
            type="case.changed",
            unit_code="WATER",
            occurred_ms=occurred_ms,
            payload={"case": {"id": 1}},
            channels=tuple(delivered),
        )
        await session.flush()
        for channel, at_ms in delivered.items():
            await session.execute(
                update(DeliveryRow)
                .where(DeliveryRow.outbox_id == row.id, DeliveryRow.channel == channel)
                .values(delivered_ms=at_ms)
            )
    return row.id


async def outbox_ids(sessions: Sessions) -> list[int]:
    async with transaction(sessions, write=False) as session:
        return list(await session.scalars(select(OutboxRow.id).order_by(OutboxRow.id)))


async def delivery_ids(sessions: Sessions) -> set[int]:
    async with transaction(sessions, write=False) as session:
        return set(await session.scalars(select(DeliveryRow.outbox_id)))


def dispatcher(sessions: Sessions, registry: CollectorRegistry) -> OutboxDispatcher:
    return OutboxDispatcher(sessions, {}, registry=registry, options=KEEP, clock_ms=lambda: NOW_MS)


@pytest.mark.asyncio
async def test_outbox_pruning_removes_only_old_delivered_events(
    sessions: Sessions, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="alerting.dispatcher")
    old_delivered = await add_event(sessions, OLD, mqtt=OLD + 1000, webhook=OLD + 2000)
    one_pending = await add_event(sessions, OLD, mqtt=OLD + 1000, webhook=None)
    delivered_lately = await add_event(sessions, OLD, mqtt=OLD + 1000, webhook=RECENT)
    recent = await add_event(sessions, RECENT, mqtt=RECENT + 1000)
    never_delivered = await add_event(sessions, OLD, mqtt=None)
    old_again = await add_event(sessions, OLD, mqtt=OLD + 5000)
    newest = await add_event(sessions, OLD, mqtt=OLD + 6000)  # old, but the newest id
    registry = CollectorRegistry()

    removed = await dispatcher(sessions, registry).prune()

    kept = [one_pending, delivered_lately, recent, never_delivered, newest]
    assert removed == 2
    assert await outbox_ids(sessions) == kept
    assert await delivery_ids(sessions) == set(kept)
    assert old_delivered not in kept
    assert old_again not in kept
    assert registry.get_sample_value("smartcover_outbox_pruned_total") == 2
    assert "outbox: pruned 2 events delivered more than 30 days ago" in caplog.messages
    assert await dispatcher(sessions, CollectorRegistry()).prune() == 0  # nothing left to do


@pytest.mark.asyncio
async def test_ids_are_not_used_again_after_pruning(sessions: Sessions) -> None:
    # The live stream resumes by id: a pruned id handed out again would be skipped.
    first = [await add_event(sessions, OLD, mqtt=OLD + 1000) for _ in range(3)]
    await dispatcher(sessions, CollectorRegistry()).prune()

    later = await add_event(sessions, RECENT, mqtt=None)

    assert await outbox_ids(sessions) == [first[-1], later]
    assert later > first[-1]


@pytest.mark.asyncio
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_one_pruner_at_a_time(sessions: Sessions) -> None:
    await add_event(sessions, OLD, mqtt=OLD + 1000)
    await add_event(sessions, OLD, mqtt=OLD + 1000)
    lock = text("SELECT pg_advisory_xact_lock(:key)").bindparams(key=PRUNE_LOCK_KEY)

    async with transaction(sessions) as other_process:
        await other_process.execute(lock)
        assert await prune_delivered(sessions, before_ms=NOW_MS, limit=10) is None

    assert await prune_delivered(sessions, before_ms=NOW_MS, limit=10) == 1


# -- dead letters ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_service_prunes_dead_letters_past_their_age(
    mosquitto: MosquittoServer, influx_server: InfluxServer, influx_db: str, tmp_path: Path
) -> None:
    env = service_env(
        mosquitto, influx_server, influx_db, tmp_path, SMARTCOVER_DEADLETTER_KEEP_DAYS="90"
    )
    log = deadletter_log(settings_of(env))
    old, recent = (now_ms() - days * DAY_MS for days in (91, 89))
    letters = [dead_letter(old), dead_letter(old + 1), dead_letter(recent)]
    log.append(letters)

    async with running_service(env) as parts:
        await wait_until(
            lambda: len(log.newest(10)) == 1,
            timeout_s=10,
            what="the old dead letters to go",
        )
        pruned = parts.metrics.registry.get_sample_value("smartcover_deadletters_pruned_total")

    assert log.newest(10) == [letters[-1]]
    assert pruned == 2


def dead_letter(at_ms: int) -> DeadLetter:
    return DeadLetter.of(
        at_ms=at_ms, topic="covers/x/telemetry", reason="bad_json", detail="", payload=b"{"
    )
