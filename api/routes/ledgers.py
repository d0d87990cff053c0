"""The ledgers as files: census, problems and acceptance, CSV or XLSX, Chinese or English."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Response

from api.deps import SessionDep, ViewerKey
from api.errors import ERRORS, BadRequest, Forbidden
from api.ledgers import (
    TITLES,
    Format,
    Lang,
    Ledger,
    Sheet,
    acceptance_sheets,
    census_sheets,
    problem_sheets,
    render_csv,
    render_xlsx,
)
from api.periods import DEFAULT_TZ, day_bounds_ms, zone
from api.routes.registry import UNIT_CODE

router = APIRouter(prefix="/api/v1", tags=["ledgers"], responses=ERRORS)

_MEDIA = {
    Format.CSV: "text/csv; charset=utf-8",
    Format.XLSX: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
_FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The ledger as a file",
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            _MEDIA[Format.XLSX]: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _disposition(name: tuple[str, str]) -> str:
    # An ASCII fallback name, and the Chinese one for clients that read RFC 5987.
    return f"attachment; filename=\"{name[0]}\"; filename*=UTF-8''{quote(name[1])}"


@router.get("/ledgers/{ledger}", response_class=Response, responses=_FILE)
async def ledger(
    *,
    ledger: Ledger,
    key: ViewerKey,
    session: SessionDep,
    format: Format = Format.CSV,
    lang: Lang = Lang.ZH,
    unit: Annotated[str | None, Query(pattern=UNIT_CODE)] = None,
    from_: Annotated[date | None, Query(alias="from", description="First day")] = None,
    to: Annotated[date | None, Query(description="Last day (included)")] = None,
    tz: Annotated[str, Query(max_length=64, description="IANA time zone")] = DEFAULT_TZ,
) -> Response:
    """census: the covers as the census import reads them (XLSX: units and devices too),
    a snapshot that takes no period. problems: every case opened from `from` to `to`.
    acceptance: verified and closed cases verified in that period. A crew gets its unit's."""
    if key.unit_code is not None:
        if unit not in (None, key.unit_code):
            raise Forbidden("a crew key gets its own unit's ledgers")
        unit = key.unit_code
    zone_info = zone(tz)
    start_ms, end_ms = day_bounds_ms(from_, to, zone_info)
    sheets: list[Sheet]
    if ledger is Ledger.CENSUS:
        if from_ is not None or to is not None:
            raise BadRequest("the census is a snapshot: `from` and `to` do not apply")
        sheets = await census_sheets(session=session, unit=unit)
    elif ledger is Ledger.PROBLEMS:
        sheets = await problem_sheets(
            session=session, unit=unit, start_ms=start_ms, end_ms=end_ms, tz=zone_info
        )
    else:
        sheets = await acceptance_sheets(
            session=session, unit=unit, start_ms=start_ms, end_ms=end_ms, tz=zone_info
        )
    body = render_csv(sheets[0], lang) if format is Format.CSV else render_xlsx(sheets, lang)
    en, zh = TITLES[ledger]
    suffix = f"{'-' + unit if unit else ''}.{format.value}"
    return Response(
        body,
        media_type=_MEDIA[format],
        headers={"Content-Disposition": _disposition((en + suffix, zh + suffix))},
    )
