"""Monthly progress per unit, ranked (see api.stats for the definitions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ContextDep, SessionDep, ViewerKey
from api.errors import ERRORS
from api.periods import DEFAULT_TZ, current_month, month_bounds, zone
from api.schemas import StatsOut
from api.stats import TARGET_SHARE, unit_stats

router = APIRouter(prefix="/api/v1", tags=["stats"], responses=ERRORS)


@router.get("/stats/units")
async def stats_by_unit(
    *,
    _key: ViewerKey,
    session: SessionDep,
    context: ContextDep,
    month: Annotated[str | None, Query(description="YYYY-MM; default: this month")] = None,
    tz: Annotated[str, Query(max_length=64, description="IANA time zone")] = DEFAULT_TZ,
) -> StatsOut:
    """Per unit: covers, problem covers, remediated share against the 40 % target, median
    times to acknowledge and to resolve, overdue cases, rank."""
    zone_info = zone(tz)
    month = month or current_month(context.clock_ms(), zone_info)
    start, end = month_bounds(month, zone_info)
    return StatsOut(
        month=month,
        tz=tz,
        period_start=start,
        period_end=end,
        target_share=TARGET_SHARE,
        units=await unit_stats(session=session, start=start, end=end),
    )
