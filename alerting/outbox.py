"""The durable outbox: events are written in the same transaction as the change they report,
and removed in batches once delivered on every channel and old enough."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.models import DeliveryRow, OutboxRow
from core.db import transaction

# Channels every event goes out on; "webhook" only for units that have a webhook URL.
MQTT_CHANNEL = "mqtt"
WEBHOOK_CHANNEL = "webhook"
# PostgreSQL advisory lock key of outbox pruning ("smartcov" in ASCII): one pruner at a time.
PRUNE_LOCK_KEY = 0x736D617274636F76


async def enqueue(
    session: AsyncSession,
    *,
    type: str,  # the event field's name in the webhook contract (DESIGN §11)
    unit_code: str,
    occurred_ms: int,
    payload: dict[str, Any],
    channels: tuple[str, ...],
) -> OutboxRow:
    """Adds an event and one pending delivery per channel to the caller's transaction."""
    row = OutboxRow(
        event_id=str(uuid.uuid4()),
        type=type,
        unit_code=unit_code,
        occurred_ms=occurred_ms,
        payload=payload,
    )
    session.add(row)
    await session.flush()  # assigns row.id for the deliveries
    for channel in channels:
        session.add(
            DeliveryRow(outbox_id=row.id, channel=channel, attempts=0, next_attempt_ms=occurred_ms)
        )
    return row


async def prune_delivered(
    sessions: async_sessionmaker[AsyncSession], *, before_ms: int, limit: int
) -> int | None:
    """Removes up to `limit` events delivered on every channel before `before_ms`, oldest
    first, in one short transaction; returns how many, or None when another process is
    pruning (PostgreSQL). Undelivered events stay whatever their age.

    The newest event always stays: SQLite hands out max(id) + 1, and an id used again
    would be skipped by a live stream resuming from it (`api.stream`).
    """
    pending_or_recent = exists().where(
        DeliveryRow.outbox_id == OutboxRow.id,
        or_(DeliveryRow.delivered_ms.is_(None), DeliveryRow.delivered_ms >= before_ms),
    )
    newest = select(func.max(OutboxRow.id)).scalar_subquery()
    old = (
        select(OutboxRow.id)
        .where(OutboxRow.id < newest, OutboxRow.occurred_ms < before_ms, ~pending_or_recent)
        .order_by(OutboxRow.id)
        .limit(limit)
    )
    async with transaction(sessions) as session:
        if not await _pruning_lock(session):
            return None
        ids = list(await session.scalars(old))
        if ids:
            await session.execute(delete(DeliveryRow).where(DeliveryRow.outbox_id.in_(ids)))
            await session.execute(delete(OutboxRow).where(OutboxRow.id.in_(ids)))
    return len(ids)


async def _pruning_lock(session: AsyncSession) -> bool:
    """PostgreSQL: this transaction's advisory lock, if free. SQLite has one writer anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    query = text("SELECT pg_try_advisory_xact_lock(:key)").bindparams(key=PRUNE_LOCK_KEY)
    return bool(await session.scalar(query))
