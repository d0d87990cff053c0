"""The durable outbox: events are written in the same transaction as the change they report."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import DeliveryRow, OutboxRow

# Channels every event goes out on; "webhook" only for units that have a webhook URL.
MQTT_CHANNEL = "mqtt"
WEBHOOK_CHANNEL = "webhook"


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
