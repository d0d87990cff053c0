"""Monthly progress per unit, the figures the district ranks its units by.

For month M, the half-open period [start, end) in the district's time zone:

- covers: covers the unit owns, registered before `end`.
- problem covers: covers with at least one of the unit's cases opened before `end`
  (cumulative: the rectification runs over years). Cancelled cases are false alarms,
  not problems.
- remediated covers: problem covers whose latest case opened before `end` was verified
  before `end` (a cover with a newer open case is a problem again).
- remediated share: remediated ÷ problem covers, against the yearly target of 40 %.
- median time to acknowledge / to resolve: over the unit's cases first acknowledged
  (resolved) within the month, from opening to that first time, in seconds.
- overdue cases: the unit's cases that missed a deadline (were escalated) in the month.
- rank: among units with problem covers, by remediated share (higher first), then
  overdue cases (fewer first); equal figures share a rank (1, 2, 2, 4).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import CaseEventRow, CaseRow, CaseStatus
from api.schemas import UnitStats
from core import registry
from core.registry_models import CoverRow

TARGET_SHARE = 0.40
_MS_PER_S = 1000


@dataclass(slots=True)
class _Tally:
    """One unit's figures as the rows are read."""

    # cover → (opened_ms, case id, verified before the end) of its latest case
    latest: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    ack_s: list[float] = field(default_factory=list)
    resolve_s: list[float] = field(default_factory=list)
    overdue: set[int] = field(default_factory=set)

    def case(self, cover_id: str, opened_ms: int, case_id: int, verified: bool) -> None:
        known = self.latest.get(cover_id)
        if known is None or (opened_ms, case_id) > known[:2]:
            self.latest[cover_id] = (opened_ms, case_id, verified)

    @property
    def problem_covers(self) -> int:
        return len(self.latest)

    @property
    def remediated(self) -> int:
        return sum(1 for _, _, verified in self.latest.values() if verified)


async def _covers_by_unit(session: AsyncSession, end: datetime) -> dict[str, int]:
    rows = await session.execute(
        select(CoverRow.owner_unit, func.count())
        .where(CoverRow.created_at < end)
        .group_by(CoverRow.owner_unit)
    )
    return dict(rows.all())


async def _tally_cases(
    session: AsyncSession, tallies: dict[str, _Tally], end_ms: int
) -> dict[int, tuple[str, int]]:
    """Problem covers and their latest cases; returns case id → (unit, opened_ms)."""
    rows = await session.execute(
        select(
            CaseRow.id, CaseRow.unit_code, CaseRow.cover_id, CaseRow.opened_ms, CaseRow.state_times
        ).where(CaseRow.opened_ms < end_ms, CaseRow.status != CaseStatus.CANCELLED.value)
    )
    cases: dict[int, tuple[str, int]] = {}
    for case_id, unit, cover_id, opened_ms, times in rows:
        verified = times.get("verified")
        tallies[unit].case(cover_id, opened_ms, case_id, verified is not None and verified < end_ms)
        cases[case_id] = (unit, opened_ms)
    return cases


async def _tally_events(
    session: AsyncSession,
    tallies: dict[str, _Tally],
    cases: dict[int, tuple[str, int]],
    start_ms: int,
    end_ms: int,
) -> None:
    """First acknowledgement and resolution times, and escalations, within the month."""
    rows = await session.execute(
        select(
            CaseEventRow.case_id, CaseEventRow.action, CaseEventRow.to_status, CaseEventRow.at_ms
        )
        .where(
            CaseEventRow.at_ms < end_ms,
            CaseEventRow.action.in_(("transition", "escalate")),
        )
        .order_by(CaseEventRow.at_ms, CaseEventRow.id)
    )
    first: dict[tuple[int, str], int] = {}
    for case_id, action, to_status, at_ms in rows:
        if case_id not in cases:
            continue  # cancelled
        unit = cases[case_id][0]
        if action == "escalate":
            if at_ms >= start_ms:
                tallies[unit].overdue.add(case_id)
        elif to_status in ("acknowledged", "resolved"):
            first.setdefault((case_id, to_status), at_ms)
    for (case_id, milestone), at_ms in first.items():
        if at_ms < start_ms:
            continue
        unit, opened_ms = cases[case_id]
        seconds = (at_ms - opened_ms) / _MS_PER_S
        tally = tallies[unit]
        (tally.ack_s if milestone == "acknowledged" else tally.resolve_s).append(seconds)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _rank(stats: list[UnitStats]) -> list[UnitStats]:
    """Competition ranking of the units with problem covers; the others last, unranked."""
    ranked = sorted(
        (s for s in stats if s.remediated_share is not None),
        key=lambda s: (-(s.remediated_share or 0.0), s.overdue_cases, s.unit_code),
    )
    out: list[UnitStats] = []
    for position, item in enumerate(ranked, start=1):
        previous = out[-1] if out else None
        same = previous is not None and (previous.remediated_share, previous.overdue_cases) == (
            item.remediated_share,
            item.overdue_cases,
        )
        rank = previous.rank if same and previous is not None else position
        out.append(item.model_copy(update={"rank": rank}))
    unranked = sorted((s for s in stats if s.remediated_share is None), key=lambda s: s.unit_code)
    return out + unranked


async def unit_stats(*, session: AsyncSession, start: datetime, end: datetime) -> list[UnitStats]:
    """Every unit's figures for the period [start, end) (see the module's definitions)."""
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    tallies: dict[str, _Tally] = defaultdict(_Tally)
    covers = await _covers_by_unit(session, end)
    cases = await _tally_cases(session, tallies, end_ms)
    await _tally_events(session, tallies, cases, start_ms, end_ms)
    stats = []
    for unit in await registry.list_units(session=session):
        tally = tallies[unit.code]
        problems = tally.problem_covers
        share = tally.remediated / problems if problems else None
        stats.append(
            UnitStats(
                unit_code=unit.code,
                unit_name=unit.name,
                covers=covers.get(unit.code, 0),
                problem_covers=problems,
                remediated_covers=tally.remediated,
                remediated_share=share,
                meets_target=None if share is None else share >= TARGET_SHARE,
                median_ack_s=_median(tally.ack_s),
                median_resolve_s=_median(tally.resolve_s),
                overdue_cases=len(tally.overdue),
                rank=None,
            )
        )
    return _rank(stats)
