"""The live stream of alert and case events (server-sent events from the outbox)."""

from __future__ import annotations

from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Header, Request

from api.deps import ContextDep, ViewerKey
from api.errors import ERRORS, BadRequest
from api.stream import EventStreamResponse, OutboxFeed, outbox_events

router = APIRouter(prefix="/api/v1", tags=["stream"], responses=ERRORS)

_MAX_ID = 2**31 - 1  # outbox ids are 32-bit integers in the database
# What OpenAPI 3.2 says of an event stream's items (FastAPI's own SSE answers say the same).
_EVENTS: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "itemSchema": {
                    "type": "object",
                    "properties": {
                        "data": {"type": "string"},
                        "event": {"type": "string"},
                        "id": {"type": "string"},
                        "retry": {"type": "integer", "minimum": 0},
                    },
                }
            }
        }
    }
}


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


def outbox_feed(request: Request, context: ContextDep) -> OutboxFeed:
    """The app's one feed, made on first use: every stream of the process shares it."""
    state = request.app.state
    if getattr(state, "outbox_feed", None) is None:
        state.outbox_feed = OutboxFeed(
            sessions=context.sessions, signal=context.signal, config=context.stream
        )
    return cast(OutboxFeed, state.outbox_feed)


@router.get("/stream", status_code=200, response_class=EventStreamResponse, responses=_EVENTS)
async def stream(
    key: ViewerKey,
    feed: Annotated[OutboxFeed, Depends(outbox_feed)],
    last_id: Annotated[int | None, Depends(last_event_id)],
) -> EventStreamResponse:
    """Alert and case events as they are written: `id` is the outbox id (send it back as
    `Last-Event-ID` to resume exactly after it), `event` the type, `data` the webhook's
    JSON body. A crew gets its unit's events. A comment every 15 s keeps it open; a client
    that falls too far behind is cut off (a comment says so) and resumes by its last id.
    The stream ends within seconds of its key's revocation."""
    events = outbox_events(feed=feed, unit_code=key.unit_code, last_id=last_id, key_id=key.id)
    return EventStreamResponse(events)
