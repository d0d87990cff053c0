"""Monthly progress per unit, ranked (see api.stats for the definitions)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ContextDep, SessionDep, ViewerKey
from api.errors import ERRORS
from api.periods import DEFAULT_TZ, MonthQuery, TzQuery, current_month, month_bounds, zone
from api.schemas import StatsOut
from api.stats import TARGET_SHARE, unit_stats

router = APIRouter(prefix="/api/v1", tags=["stats"], responses=ERRORS)


@router.get("/stats/units")
async def stats_by_unit(
    *,
    _key: ViewerKey,
    session: SessionDep,
    context: ContextDep,
    month: MonthQuery = None,
    tz: TzQuery = DEFAULT_TZ,
) -> StatsOut:
    """Per unit: covers, problem covers, remediated share against the 40 % target, median
    times to acknowledge and to resolve, overdue cases, rank."""
    zone_info = zone(tz)
    # Absent: this month. An empty month= is a bad month (400), as the schema says.
    month = month if month is not None else current_month(context.clock_ms(), zone_info)
    start, end = month_bounds(month, zone_info)
    return StatsOut(
        month=month,
        tz=tz,
        period_start=start,
        period_end=end,
        target_share=TARGET_SHARE,
        units=await unit_stats(session=session, start=start, end=end),
    )
