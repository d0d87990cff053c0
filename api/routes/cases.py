"""Alerts, and cases: the urgent-first list, a case's detail, and its transitions."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select

from alerting.cases import CaseDesk
from alerting.models import CaseStatus
from alerting.rules import AlertKind
from api import cases
from api.deps import ContextDep, CrewKey, SessionDep, ViewerKey
from api.errors import ERRORS, WRITE_ERRORS, Forbidden
from api.models import Role
from api.routes.registry import COVER_ID, UNIT_CODE
from api.schemas import (
    DEFAULT_LIMIT,
    AlertOut,
    CaseDetail,
    CaseOut,
    Limit,
    Offset,
    Page,
    TransitionIn,
    page_of,
)
from core.db import transaction
from core.registry_models import UnitRow

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", responses=ERRORS)

# What a crew does on site; dispatching, verifying (复核), closing and cancelling are the
# dispatchers' (a crew does not check its own work).
CREW_MOVES = frozenset({CaseStatus.ACKNOWLEDGED, CaseStatus.ON_SITE, CaseStatus.RESOLVED})
_MAX_ID = 2**31 - 1  # ids are 32-bit integers in the database
CaseIdPath = Annotated[int, Path(ge=1, le=_MAX_ID)]
CoverIdQuery = Annotated[str | None, Query(pattern=COVER_ID)]


@router.get("/alerts", tags=["alerts"])
async def list_alerts(
    *,
    key: ViewerKey,
    session: SessionDep,
    active: bool | None = None,
    cover_id: CoverIdQuery = None,
    kind: AlertKind | None = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[AlertOut]:
    """Alerts, newest first; a crew sees its unit's."""
    alerts = await cases.list_alerts(
        session=session,
        active=active,
        cover_id=cover_id,
        kind=kind.value if kind else None,
        crew_unit=key.unit_code,
        limit=limit + 1,
        offset=offset,
    )
    return page_of(alerts, limit=limit, offset=offset)


@router.get("/cases", tags=["cases"])
async def list_cases(
    *,
    key: ViewerKey,
    session: SessionDep,
    status: CaseStatus | None = None,
    unit: Annotated[str | None, Query(pattern=UNIT_CODE)] = None,
    overdue: bool | None = None,
    cover_id: CoverIdQuery = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[CaseOut]:
    """Urgent first: open before finished, then severity, then the nearest deadline.
    A crew sees its unit's cases only."""
    found = await cases.list_cases(
        session=session,
        status=status,
        unit_code=unit,
        crew_unit=key.unit_code,
        overdue=overdue,
        cover_id=cover_id,
        limit=limit + 1,
        offset=offset,
    )
    return page_of(found, limit=limit, offset=offset)


@router.get("/cases/{case_id}", tags=["cases"])
async def get_case(*, case_id: CaseIdPath, key: ViewerKey, session: SessionDep) -> CaseDetail:
    """A case with its timeline, linked alerts and incident."""
    return await cases.get_case(session=session, case_id=case_id, crew_unit=key.unit_code)


@router.post("/cases/{case_id}/transitions", tags=["cases"], responses=WRITE_ERRORS)
async def transition(
    *, case_id: CaseIdPath, move: TransitionIn, key: CrewKey, context: ContextDep
) -> CaseOut:
    """Moves a case (DESIGN §6), recording the key's holder as the actor. An illegal move
    is a 409 naming the allowed ones; cancelling needs a reason in the note. Crews move
    their own unit's cases, to acknowledged, on_site and resolved."""
    if key.role is Role.CREW and move.to not in CREW_MOVES:
        allowed = ", ".join(sorted(CREW_MOVES))
        raise Forbidden(f"a crew moves cases to {allowed}; {move.to.value} is a dispatcher's")
    async with transaction(context.sessions) as session:
        # Units with a webhook get the change there too (the desk routes by unit).
        webhooks = await session.scalars(
            select(UnitRow.code).where(UnitRow.webhook_url.is_not(None))
        )
        desk = CaseDesk(session, context.case_policy, webhook_units=frozenset(webhooks))
        row = await desk.transition(
            case_id=case_id,
            to=move.to.value,
            actor=key.name,
            note=move.note,
            now_ms=context.clock_ms(),
            unit_code=key.unit_code,
        )
        out = cases.case_out(row)
    context.signal.notify()
    logger.info("case %d → %s by %s (key %d)", case_id, move.to.value, key.name, key.id)
    return out
