"""The live stream of alert and case events (server-sent events from the outbox)."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import ContextDep, ViewerKey
from api.errors import ERRORS, BadRequest
from api.stream import outbox_events

router = APIRouter(prefix="/api/v1", tags=["stream"], responses=ERRORS)

_MAX_ID = 2**31 - 1  # outbox ids are 32-bit integers in the database


def last_event_id(
    value: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="Resume after this event (an outbox id)"),
    ] = None,
) -> int | None:
    # Checked before the stream starts: afterwards the status line is already sent.
    if value is None or value == "":
        return None
    if not value.isascii() or not value.isdigit() or int(value) > _MAX_ID:
        raise BadRequest(f"Last-Event-ID {value[:30]!r} is not an event id", code="bad_event_id")
    return int(value)


@router.get("/stream", response_class=EventSourceResponse)
async def stream(
    key: ViewerKey,
    context: ContextDep,
    last_id: Annotated[int | None, Depends(last_event_id)],
) -> AsyncIterable[ServerSentEvent]:
    """Alert and case events as they are written: `id` is the outbox id (send it back as
    `Last-Event-ID` to resume exactly after it), `event` the type, `data` the webhook's
    JSON body. A crew gets its unit's events. A comment every 15 s keeps it open."""
    async for event in outbox_events(
        sessions=context.sessions,
        signal=context.signal,
        config=context.stream,
        unit_code=key.unit_code,
        last_id=last_id,
    ):
        yield event
