"""Reading cases and alerts for the API: filters, urgent-first order, a case's detail."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.cases import MILESTONES, TRANSITIONS, alert_json, case_json
from alerting.models import AlertRow, AlertStatus, CaseEventRow, CaseRow, CaseStatus, IncidentRow
from api.errors import NotFoundError
from api.schemas import AlertOut, CaseDetail, CaseOut, IncidentOut, TimelineEvent

FINISHED = (CaseStatus.CLOSED.value, CaseStatus.CANCELLED.value)
# Milestones in the order a case meets them; each one's deadline is later than the one
# before (one cannot be on site before acknowledging), so the first unmet one is the next.
_ORDER = ("acknowledged", "on_site", "resolved")
_SEVERITY_ORDER = ("critical", "major", "minor")


def next_deadline_ms(row: CaseRow) -> int | None:
    if row.status in FINISHED:
        return None
    for milestone in _ORDER:
        due = row.deadlines.get(milestone)
        if due is not None and row.status not in MILESTONES[milestone]:
            return due
    return None


def _next_deadline_sql() -> ColumnElement[Any]:
    """`next_deadline_ms` in SQL, for ordering (JSON paths work on SQLite and PostgreSQL)."""
    # as_float: epoch ms do not fit PostgreSQL's 32-bit INTEGER, and a double holds them.
    due = {m: CaseRow.deadlines[m].as_float() for m in _ORDER}
    return case(
        (
            CaseRow.status.in_(("open", "dispatched")),
            func.coalesce(due["acknowledged"], due["on_site"], due["resolved"]),
        ),
        (CaseRow.status == "acknowledged", func.coalesce(due["on_site"], due["resolved"])),
        (CaseRow.status == "on_site", due["resolved"]),
        else_=None,
    )


def case_out(row: CaseRow) -> CaseOut:
    return CaseOut.model_validate({**case_json(row), "next_deadline_ms": next_deadline_ms(row)})


def alert_out(row: AlertRow) -> AlertOut:
    return AlertOut.model_validate(
        {
            **alert_json(row),
            "received_ms": row.received_ms,
            "committed_ms": row.committed_ms,
            "notified_ms": row.notified_ms,
        }
    )


def _urgent_first(query: Select[CaseRow]) -> Select[CaseRow]:
    """Open cases before finished ones; then severity; then the nearest deadline."""
    finished = case((CaseRow.status.in_(FINISHED), 1), else_=0)
    severity = case(
        *((CaseRow.severity == name, rank) for rank, name in enumerate(_SEVERITY_ORDER)),
        else_=len(_SEVERITY_ORDER),
    )
    deadline = _next_deadline_sql()
    # `IS NULL` first: NULLS LAST spelled so that SQLite and PostgreSQL agree.
    return query.order_by(finished, severity, deadline.is_(None), deadline, CaseRow.id)


async def list_cases(
    *,
    session: AsyncSession,
    status: CaseStatus | None = None,
    unit_code: str | None = None,
    crew_unit: str | None = None,
    overdue: bool | None = None,
    cover_id: str | None = None,
    limit: int,
    offset: int,
) -> list[CaseOut]:
    """Cases urgent first; `crew_unit` limits them to a crew's unit whatever else is asked."""
    query = select(CaseRow)
    if status is not None:
        query = query.where(CaseRow.status == status.value)
    for unit in (unit_code, crew_unit):
        if unit is not None:
            query = query.where(CaseRow.unit_code == unit)
    if overdue is not None:
        query = query.where(CaseRow.overdue.is_(overdue))
    if cover_id is not None:
        query = query.where(CaseRow.cover_id == cover_id)
    query = _urgent_first(query).limit(limit).offset(offset)
    return [case_out(row) for row in await session.scalars(query)]


async def get_case(*, session: AsyncSession, case_id: int, crew_unit: str | None) -> CaseDetail:
    """A case with its timeline, alerts and incident; another unit's case is not found."""
    row = await session.get(CaseRow, case_id)
    if row is None or (crew_unit is not None and row.unit_code != crew_unit):
        raise NotFoundError(f"case {case_id} not found")
    events = await session.scalars(
        select(CaseEventRow)
        .where(CaseEventRow.case_id == case_id)
        .order_by(CaseEventRow.at_ms, CaseEventRow.id)
    )
    alerts = await session.scalars(
        select(AlertRow)
        .where(AlertRow.case_id == case_id)
        .order_by(AlertRow.raised_ms, AlertRow.id)
    )
    incident = await session.get(IncidentRow, row.incident_id) if row.incident_id else None
    return CaseDetail(
        **case_out(row).model_dump(),
        timeline=[TimelineEvent.model_validate(e, from_attributes=True) for e in events],
        alerts=[alert_out(alert) for alert in alerts],
        incident=IncidentOut.model_validate(incident, from_attributes=True) if incident else None,
        allowed_transitions=sorted(TRANSITIONS[CaseStatus(row.status)]),
    )


async def list_alerts(
    *,
    session: AsyncSession,
    active: bool | None = None,
    cover_id: str | None = None,
    kind: str | None = None,
    crew_unit: str | None = None,
    limit: int,
    offset: int,
) -> list[AlertOut]:
    """Alerts newest first; a crew sees those of its unit's cases."""
    query = select(AlertRow)
    if active is not None:
        wanted = AlertStatus.ACTIVE if active else AlertStatus.CLEARED
        query = query.where(AlertRow.status == wanted.value)
    if cover_id is not None:
        query = query.where(AlertRow.cover_id == cover_id)
    if kind is not None:
        query = query.where(AlertRow.kind == kind)
    if crew_unit is not None:
        query = query.join(CaseRow, CaseRow.id == AlertRow.case_id).where(
            CaseRow.unit_code == crew_unit
        )
    query = query.order_by(AlertRow.raised_ms.desc(), AlertRow.id.desc())
    return [alert_out(row) for row in await session.scalars(query.limit(limit).offset(offset))]
