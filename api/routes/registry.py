"""Units, covers and devices: list, get, create, update; and the census import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.deps import (
    AdminKey,
    ApiContext,
    ContextDep,
    DispatcherKey,
    SessionDep,
    ViewerKey,
    registry_write,
)
from api.errors import ERRORS, WRITE_ERRORS, Forbidden, TooLarge, Unprocessable, error_doc
from api.heavy import HeavySlot
from api.models import Role
from api.schemas import DEFAULT_LIMIT, CensusReportOut, Limit, Offset, Page, UnitOut, page_of
from core import registry
from core.census import import_census, read_census, summary
from core.registry_cache import RegistryChange
from core.registry_schemas import (
    Cover,
    CoverCreate,
    CoverUpdate,
    Device,
    DeviceBinding,
    DeviceCreate,
    DeviceUpdate,
    Unit,
    UnitKind,
    UnitUpdate,
    changes,
)
from core.text import PLAIN_PATTERN
from core.unregistered import UnregisteredDevice, list_unregistered

router = APIRouter(prefix="/api/v1", tags=["registry"], responses=ERRORS)

# Path parameters carry their patterns so that nothing odd reaches the database (a NUL
# byte, which PostgreSQL refuses with an error) and the schema says what is accepted.
UNIT_CODE = r"^[A-Za-z0-9_.-]{1,64}$"
COVER_ID = r"^[0-9]{16}$"
DEVICE_ID = r"^[A-Za-z0-9_.-]{1,64}$"
UnitCodePath = Annotated[str, Path(pattern=UNIT_CODE)]
CoverIdPath = Annotated[str, Path(pattern=COVER_ID, description="16-digit standard number")]
DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID)]


class _CoverSegment(Convertor[str]):
    """A path segment but `import`, so that /covers/import is no cover's path: its GET
    and PATCH answer 405 (Allow: POST), not a cover number's 422. Other segments reach the
    route, whose pattern answers 422 for what is not a cover number."""

    regex = "(?!import$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("cover", _CoverSegment())

# Cover fields that decide where cases go and when alerts fire: an admin's to change.
# Dispatchers may correct the rest (state, depth, material, position…) from the field.
ADMIN_COVER_FIELDS = frozenset({"owner_unit", "maintainer_unit", "thresholds"})
# A census of the whole district is a few MB; refuse bodies far beyond it.
MAX_CENSUS_BYTES = 32 * 1024 * 1024
_XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


# -- units ------------------------------------------------------------------------------


@router.get("/units")
async def list_units(
    *,
    key: ViewerKey,
    session: SessionDep,
    kind: UnitKind | None = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[UnitOut]:
    """Units in code order (owners and maintainers of covers); webhook URLs in full for
    admins, masked for everyone else."""
    units = await registry.list_units(session=session, kind=kind)
    reveal = key.at_least(Role.ADMIN)
    page = [UnitOut.of(unit, reveal=reveal) for unit in units[offset : offset + limit + 1]]
    return page_of(page, limit=limit, offset=offset)


@router.get("/units/{code}")
async def get_unit(*, code: UnitCodePath, key: ViewerKey, session: SessionDep) -> UnitOut:
    unit = await registry.get_unit(session=session, code=code)
    return UnitOut.of(unit, reveal=key.at_least(Role.ADMIN))


@router.post("/units", status_code=status.HTTP_201_CREATED, responses=WRITE_ERRORS)
async def create_unit(*, unit: Unit, _key: AdminKey, context: ContextDep) -> UnitOut:
    """A unit record of DESIGN §11; the webhook secret is never shown again."""
    _refuse_unreachable_webhook(context, unit.webhook_url)
    async with registry_write(context, RegistryChange(units=True)) as session:
        return UnitOut.of(await registry.create_unit(session=session, unit=unit), reveal=True)


@router.patch("/units/{code}", responses=WRITE_ERRORS)
async def update_unit(
    *, code: UnitCodePath, update: UnitUpdate, _key: AdminKey, context: ContextDep
) -> UnitOut:
    """Changes the fields given (null clears an optional one)."""
    _refuse_unreachable_webhook(context, update.webhook_url)
    async with registry_write(context, RegistryChange(units=True)) as session:
        unit = await registry.update_unit(session=session, code=code, update=update)
        return UnitOut.of(unit, reveal=True)


def _refuse_unreachable_webhook(context: ApiContext, url: str | None) -> None:
    """A webhook URL naming a refused address (an IP literal, `localhost`) is refused as
    it is written; a name is checked at each delivery, on the addresses it resolves to."""
    problem = None if url is None else context.outbound.url_problem(url)
    if problem is not None:
        raise Unprocessable(
            f"webhook_url: {problem}",
            code="outbound_refused",
            details={"field": "webhook_url", "reason": problem},
        )


# -- covers -----------------------------------------------------------------------------


@router.get("/covers")
async def list_covers(
    *,
    _key: ViewerKey,
    session: SessionDep,
    owner_unit: Annotated[str | None, Query(pattern=UNIT_CODE)] = None,
    road: Annotated[
        str | None,
        # The app refuses control characters in every parameter (api.deps): stated here.
        Query(min_length=1, max_length=100, json_schema_extra={"pattern": PLAIN_PATTERN}),
    ] = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[Cover]:
    """Covers in number order, of one owner unit or on one road if asked."""
    covers = await registry.list_covers(
        session=session, owner_unit=owner_unit, road=road, limit=limit + 1, offset=offset
    )
    return page_of(covers, limit=limit, offset=offset)


@router.get("/covers/{cover_id:cover}")
async def get_cover(*, cover_id: CoverIdPath, _key: ViewerKey, session: SessionDep) -> Cover:
    return await registry.get_cover(session=session, cover_id=cover_id)


@router.post("/covers", status_code=status.HTTP_201_CREATED, responses=WRITE_ERRORS)
async def create_cover(*, cover: CoverCreate, _key: AdminKey, context: ContextDep) -> Cover:
    async with registry_write(context, RegistryChange(covers={cover.cover_id})) as session:
        return await registry.create_cover(session=session, cover=cover)


@router.patch("/covers/{cover_id:cover}", responses=WRITE_ERRORS)
async def update_cover(
    *, cover_id: CoverIdPath, update: CoverUpdate, key: DispatcherKey, context: ContextDep
) -> Cover:
    """Dispatchers may correct a cover's facts; owner, maintainer and thresholds need an
    admin, as they decide where cases go and when alerts fire."""
    reserved = sorted(ADMIN_COVER_FIELDS & changes(update).keys())
    if reserved and not key.at_least(Role.ADMIN):
        raise Forbidden(f"changing {', '.join(reserved)} needs an admin key")
    async with registry_write(context, RegistryChange(covers={cover_id})) as session:
        return await registry.update_cover(session=session, cover_id=cover_id, update=update)


_CENSUS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A census file (DESIGN §11): UTF-8 CSV, or XLSX; as the raw body, or"
        " as the `file` field of a form (`curl -F file=@census.xlsx`)",
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            _XLSX: {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
# A form carries one file and a few small fields at most (a browser adds none).
_MAX_FORM_FIELDS = 8


async def _read_body(request: Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the file is over {limit // (1024 * 1024)} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _census_file(request: Request) -> bytes:
    """The census file: the raw body, or the `file` part of a multipart form."""
    body = await _read_body(request, MAX_CENSUS_BYTES)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=1, max_fields=_MAX_FORM_FIELDS)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise Unprocessable(f"the form could not be read: {exc.message}", code="bad_form") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise Unprocessable(
                "the form has no file named 'file' (curl -F file=@census.xlsx)", code="no_file"
            )
        return await upload.read()
    finally:
        await form.close()


@router.post(
    "/covers/import",
    responses={
        **WRITE_ERRORS,
        413: error_doc("The file is too large"),
        422: error_doc("Rows were rejected (details: the report) or the file is unusable"),
    },
    openapi_extra=_CENSUS_BODY,
)
async def import_covers(
    *,
    request: Request,
    _key: AdminKey,
    _slot: HeavySlot,
    context: ContextDep,
    ignore_unknown: bool = False,
    dry_run: bool = False,
    skip_invalid: bool = False,
) -> CensusReportOut:
    """Imports a census file: every row or none, unless `skip_invalid` (then the valid
    rows, and a report of the rejected ones). Rejected rows answer 422 with the report."""
    # Parsing a city's XLSX takes seconds of CPU: in a thread, so alarms are not held up.
    table = await asyncio.to_thread(read_census, await _census_file(request))
    async with registry_write(context, RegistryChange(everything=True)) as session:
        report = await import_census(
            session=session,
            table=table,
            ignore_unknown=ignore_unknown,
            dry_run=dry_run,
            skip_invalid=skip_invalid,
        )
    out = CensusReportOut.model_validate({**asdict(report), "summary": summary(report)})
    if report.errors and not skip_invalid:
        raise Unprocessable(
            f"{report.rejected_rows} of {report.rows} rows rejected: nothing imported",
            code="census_rejected",
            details=out.model_dump(mode="json"),
        )
    return out


# -- devices ----------------------------------------------------------------------------


@router.get("/devices")
async def list_devices(
    *,
    _key: ViewerKey,
    session: SessionDep,
    bound: bool | None = None,
    limit: Limit = DEFAULT_LIMIT,
    offset: Offset = 0,
) -> Page[Device]:
    """Devices in id order; `bound` keeps those on a cover (true) or on none (false)."""
    devices = await registry.list_devices(
        session=session, bound=bound, limit=limit + 1, offset=offset
    )
    return page_of(devices, limit=limit, offset=offset)


@router.get("/devices/unregistered")
async def list_unregistered_devices(
    *, _key: ViewerKey, session: SessionDep, limit: Limit = DEFAULT_LIMIT, offset: Offset = 0
) -> Page[UnregisteredDevice]:
    """Devices that published but are not in the registry, the most recently heard first:
    their readings are stored, and evaluated from the moment the device is registered."""
    devices = await list_unregistered(session=session, limit=limit + 1, offset=offset)
    return page_of(devices, limit=limit, offset=offset)


@router.get("/devices/{device_id}")
async def get_device(*, device_id: DeviceIdPath, _key: ViewerKey, session: SessionDep) -> Device:
    return await registry.get_device(session=session, device_id=device_id)


@router.post("/devices", status_code=status.HTTP_201_CREATED, responses=WRITE_ERRORS)
async def create_device(*, device: DeviceCreate, _key: AdminKey, context: ContextDep) -> Device:
    async with registry_write(context, RegistryChange(devices={device.device_id})) as session:
        return await registry.create_device(session=session, device=device)


@router.patch("/devices/{device_id}", responses=WRITE_ERRORS)
async def update_device(
    *, device_id: DeviceIdPath, update: DeviceUpdate, _key: AdminKey, context: ContextDep
) -> Device:
    async with registry_write(context, RegistryChange(devices={device_id})) as session:
        return await registry.update_device(session=session, device_id=device_id, update=update)


# -- bindings ---------------------------------------------------------------------------


class BindingRequest(BaseModel):
    """The cover a device is (now) mounted on."""

    cover_id: Annotated[str, Field(pattern=COVER_ID, description="16-digit standard number")]


@router.put("/devices/{device_id}/binding", responses=WRITE_ERRORS)
async def bind_device(
    *, device_id: DeviceIdPath, binding: BindingRequest, _key: DispatcherKey, context: ContextDep
) -> DeviceBinding:
    """Mounts the device on a cover: a sensor replaced on a cover, or moved to another.

    What it replaces ends (`replaced`, `moved`) and stays in the history; the cover keeps
    its readings, and from this answer on the device's readings are the new cover's."""
    async with registry_write(
        context, RegistryChange(devices={device_id}, covers={binding.cover_id})
    ) as session:
        return await registry.bind_device(
            session=session, device_id=device_id, cover_id=binding.cover_id
        )


@router.delete("/devices/{device_id}/binding", responses=WRITE_ERRORS)
async def unbind_device(
    *, device_id: DeviceIdPath, _key: DispatcherKey, context: ContextDep
) -> DeviceBinding:
    """Takes the device off its cover (404 when it is on none); its readings are then
    stored without a cover and evaluated against none."""
    async with registry_write(context, RegistryChange(devices={device_id})) as session:
        return await registry.unbind_device(session=session, device_id=device_id)


@router.get("/devices/{device_id}/bindings")
async def device_bindings(
    *, device_id: DeviceIdPath, _key: ViewerKey, session: SessionDep
) -> list[DeviceBinding]:
    """The covers this device was mounted on, oldest first."""
    await registry.get_device(session=session, device_id=device_id)  # 404 if unknown
    return await registry.binding_history(session=session, device_id=device_id)


@router.get("/covers/{cover_id}/bindings")
async def cover_bindings(
    *, cover_id: CoverIdPath, _key: ViewerKey, session: SessionDep
) -> list[DeviceBinding]:
    """The devices mounted on this cover over time, oldest first."""
    await registry.get_cover(session=session, cover_id=cover_id)  # 404 if unknown
    return await registry.binding_history(session=session, cover_id=cover_id)
