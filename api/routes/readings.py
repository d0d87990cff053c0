"""A cover's readings from the time-series store, raw or downsampled."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ContextDep, SessionDep, ViewerKey
from api.errors import ERRORS, Unavailable, error_doc
from api.readings import (
    DEFAULT_SPAN,
    EARLIEST,
    EVERY_PATTERN,
    MAX_RAW_POINTS,
    ReadingSeries,
    ReadingWindow,
    check_window,
    parse_every,
    require_zone,
)
from api.routes.registry import CoverIdPath
from core import registry

router = APIRouter(prefix="/api/v1", tags=["readings"], responses=ERRORS)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@router.get(
    "/covers/{cover_id}/readings",
    responses={503: error_doc("No time-series store configured, or it does not answer")},
)
async def cover_readings(
    *,
    cover_id: CoverIdPath,
    _key: ViewerKey,
    session: SessionDep,
    context: ContextDep,
    start: Annotated[datetime | None, Query(description="Default: 24 h before end")] = None,
    end: Annotated[datetime | None, Query(description="Default: now; exclusive")] = None,
    every: Annotated[
        str | None,
        Query(
            description="Bucket width (30s, 5m, 1h, 1d; at most 1d): mean and max per field",
            json_schema_extra={"pattern": EVERY_PATTERN},
        ),
    ] = None,
) -> ReadingSeries:
    """Raw readings (at most 7 days) or, with `every`, buckets (at most 92 days and 2 000
    buckets). Buckets start at multiples of `every` since the epoch (UTC). Raw readings
    are kept for the retention period (SMARTCOVER_RETENTION_RAW_DAYS); whole-hour buckets
    that start before it come from hourly aggregates, kept forever."""
    every_s = parse_every(every) if every is not None else None
    require_zone(start=start, end=end)  # before any arithmetic: naive and aware do not mix
    if end is None:
        end = datetime.fromtimestamp(context.clock_ms() / 1000, tz=UTC)
    if start is None:
        start = end - DEFAULT_SPAN if end > EARLIEST else end
    check_window(start, end, every_s)
    await registry.get_cover(session=session, cover_id=cover_id)  # 404 for an unknown cover
    if context.readings is None:
        raise Unavailable("no time-series store is configured", code="timeseries_unavailable")
    window = ReadingWindow(cover_id, _ms(start), _ms(end))
    if every_s is None:
        points = await context.readings.points(window, limit=MAX_RAW_POINTS + 1)
        return ReadingSeries(
            cover_id=cover_id,
            start=start,
            end=end,
            every_s=None,
            points=points[:MAX_RAW_POINTS],
            buckets=[],
            truncated=len(points) > MAX_RAW_POINTS,
        )
    buckets = await context.readings.buckets(window, every_s=every_s)
    return ReadingSeries(
        cover_id=cover_id,
        start=start,
        end=end,
        every_s=every_s,
        points=[],
        buckets=buckets,
        truncated=False,
    )
