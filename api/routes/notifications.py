"""Delivery state of the outbox: what is pending, failing and delivered, per channel."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from alerting.dispatcher import delivery_summary
from api.deps import ContextDep, DispatcherKey
from api.errors import ERRORS

router = APIRouter(prefix="/api/v1", tags=["notifications"], responses=ERRORS)


class ChannelOut(BaseModel):
    pending: int
    failing: int  # pending deliveries that failed at least once
    delivered: int
    oldest_pending_age_s: float | None


class FailingOut(BaseModel):
    event_id: str
    type: str
    unit_code: str
    channel: str
    attempts: int
    next_attempt_ms: int
    last_error: str | None


class NotificationsOut(BaseModel):
    channels: dict[str, ChannelOut]
    failing: list[FailingOut]  # the most-attempted pending deliveries first


@router.get("/notifications")
async def notifications(*, _key: DispatcherKey, context: ContextDep) -> NotificationsOut:
    """Delivery of alert and case events over MQTT and webhooks: a dead endpoint shows up
    here as failing deliveries with their last error, while the others go on."""
    summary = await delivery_summary(context.sessions, clock_ms=context.clock_ms)
    return NotificationsOut.model_validate(summary)
