"""The ledgers as files: census, problems and acceptance, CSV or XLSX, Chinese or English."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from datetime import date
from typing import Annotated, Any, BinaryIO, TypedDict
from urllib.parse import quote
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import ViewerKey, read_session
from api.errors import ERRORS, BadRequest, Forbidden
from api.heavy import BUSY_DOC, HeavySlot
from api.ledgers import (
    TITLES,
    Format,
    Lang,
    Ledger,
    Sheet,
    acceptance_sheets,
    census_sheets,
    csv_chunks,
    problem_sheets,
    write_xlsx,
)
from api.periods import DEFAULT_TZ, TzQuery, day_bounds_ms, zone
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
    },
    **BUSY_DOC,
}


# The read transaction lasts until the response is sent (scope="request"): its rows are
# read from the database while the body is being written.
StreamSession = Annotated[AsyncSession, Depends(read_session, scope="request")]


class Period(TypedDict):
    start_ms: int | None
    end_ms: int | None
    tz: ZoneInfo


def _disposition(name: tuple[str, str]) -> str:
    # An ASCII fallback name, and the Chinese one for clients that read RFC 5987.
    return f"attachment; filename=\"{name[0]}\"; filename*=UTF-8''{quote(name[1])}"


# Read from the file of an XLSX workbook in pieces of this size while it is sent.
_CHUNK = 256 * 1024


async def _sheets(
    ledger: Ledger, session: AsyncSession, unit: str | None, period: Period
) -> list[Sheet]:
    if ledger is Ledger.CENSUS:
        return await census_sheets(session=session, unit=unit)
    if ledger is Ledger.PROBLEMS:
        return await problem_sheets(session=session, unit=unit, **period)
    return await acceptance_sheets(session=session, unit=unit, **period)


async def _file_chunks(out: BinaryIO) -> AsyncIterator[bytes]:
    with out:
        out.seek(0)
        while chunk := await asyncio.to_thread(out.read, _CHUNK):
            yield chunk


async def _body(sheets: list[Sheet], format: Format, lang: Lang) -> AsyncIterator[bytes]:
    """CSV: rows sent as they are read. XLSX: a zip needs its end before it can be sent,
    so the workbook goes to a temporary file first (deleted once closed)."""
    if format is Format.CSV:
        return csv_chunks(sheets[0], lang)
    with contextlib.ExitStack() as on_error:
        out = on_error.enter_context(tempfile.TemporaryFile())
        await write_xlsx(sheets, lang, out)
        on_error.pop_all()  # from here on, the sending closes it
    return _file_chunks(out)


@router.get("/ledgers/{ledger}", response_class=StreamingResponse, responses=_FILE)
async def ledger(
    *,
    ledger: Ledger,
    key: ViewerKey,
    _slot: HeavySlot,
    session: StreamSession,
    format: Format = Format.CSV,
    lang: Lang = Lang.ZH,
    unit: Annotated[str | None, Query(pattern=UNIT_CODE)] = None,
    from_: Annotated[date | None, Query(alias="from", description="First day")] = None,
    to: Annotated[date | None, Query(description="Last day (included)")] = None,
    tz: TzQuery = DEFAULT_TZ,
) -> StreamingResponse:
    """census: the covers as the census import reads them (XLSX: units and devices too),
    a snapshot that takes no period. problems: every case opened from `from` to `to`.
    acceptance: verified and closed cases verified in that period. A crew gets its unit's.
    Sent as it is read, in constant memory; a key runs a few downloads at a time (429)."""
    if key.unit_code is not None:
        if unit not in (None, key.unit_code):
            raise Forbidden("a crew key gets its own unit's ledgers")
        unit = key.unit_code
    zone_info = zone(tz)
    start_ms, end_ms = day_bounds_ms(from_, to, zone_info)
    if ledger is Ledger.CENSUS and (from_ is not None or to is not None):
        raise BadRequest("the census is a snapshot: `from` and `to` do not apply")
    period = Period(start_ms=start_ms, end_ms=end_ms, tz=zone_info)
    sheets = await _sheets(ledger, session, unit, period)
    en, zh = TITLES[ledger]
    suffix = f"{'-' + unit if unit else ''}.{format.value}"
    return StreamingResponse(
        await _body(sheets, format, lang),
        media_type=_MEDIA[format],
        headers={"Content-Disposition": _disposition((en + suffix, zh + suffix))},
    )
