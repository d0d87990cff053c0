"""The three ledgers (DESIGN §6) as rows, and their CSV and XLSX renderings.

- census (普查台账): one row per cover with exactly the census columns of DESIGN §11, so
  the CSV can be imported again as it is; the XLSX adds sheets of units and devices.
- problems (问题井盖治理台账): every case, opened in the period.
- acceptance (验收销号台账): verified and closed cases, verified in the period.

Headings are English or Chinese; with Chinese headings the values a person reads
(status, severity, alert kind, yes/no) are Chinese too, in forms the census import
accepts back. Times are in the requested time zone: ISO 8601 with offset in CSV, date
cells in XLSX.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any, BinaryIO
from zoneinfo import ZoneInfo

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font
from openpyxl.worksheet._write_only import WriteOnlyWorksheet
from sqlalchemy import Row, ScalarSelect, Select, SQLColumnExpression, and_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import CaseEventRow, CaseRow, CaseStatus
from api.periods import local
from core import registry
from core.registry_models import CoverRow, DeviceBindingRow, DeviceRow, RoadRow
from core.registry_schemas import Unit

logger = logging.getLogger(__name__)


class Ledger(StrEnum):
    CENSUS = "census"
    PROBLEMS = "problems"
    ACCEPTANCE = "acceptance"


class Lang(StrEnum):
    ZH = "zh"
    EN = "en"


class Format(StrEnum):
    CSV = "csv"
    XLSX = "xlsx"


TITLES = {
    Ledger.CENSUS: ("census", "普查台账"),
    Ledger.PROBLEMS: ("problems", "问题井盖治理台账"),
    Ledger.ACCEPTANCE: ("acceptance", "验收销号台账"),
}

_ZH_VALUES: dict[str, str] = {
    # case states (CJ/T 315 flow)
    "open": "立案",
    "dispatched": "派遣",
    "acknowledged": "接单处置",
    "on_site": "到场处置",
    "resolved": "处置反馈",
    "verified": "核查通过",
    "closed": "结案",
    "cancelled": "作废",
    # severities
    "critical": "紧急",
    "major": "重要",
    "minor": "一般",
    # alert kinds
    "cover_open": "井盖开启",
    "cover_tilted": "井盖倾斜",
    "cover_displaced": "井盖位移",
    "water_high": "水位过高",
    "battery_low": "电量低",
    "device_silent": "设备失联",
    "flapping": "告警频繁",
    # cover states, as the census import reads them
    "in_service": "在用",
    "abandoned": "废弃",
    "filled": "已填埋",
}


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    en: str
    zh: str
    translate: bool = False  # a code a person reads: shown in Chinese with zh headings


CENSUS_COLUMNS = (
    Column("cover_id", "cover_id", "编号"),
    Column("kind_code", "kind_code", "类别代码"),
    Column("owner_unit", "owner_unit", "权属单位"),
    Column("maintainer_unit", "maintainer_unit", "养护单位"),
    Column("road", "road", "道路"),
    Column("grid", "grid", "网格"),
    Column("lon", "lon", "经度"),
    Column("lat", "lat", "纬度"),
    Column("depth_cm", "depth_cm", "井深"),
    Column("material", "material", "材质"),
    Column("installed_on", "installed_on", "安装日期"),
    Column("flood_prone", "flood_prone", "易涝点"),
    Column("anti_fall", "anti_fall", "防坠网"),
    Column("state", "state", "状态", translate=True),
    Column("device_id", "device_id", "设备编号"),
    Column("report_interval_s", "report_interval_s", "上报周期"),
    # The device's model and its id on a platform (DESIGN §12), as the census imports them.
    Column("model", "model", "型号"),
    Column("source", "source", "来源"),
    Column("external_id", "external_id", "外部编号"),
)
UNIT_COLUMNS = (
    Column("code", "code", "单位代码"),
    Column("name", "name", "单位名称"),
    Column("kind", "kind", "单位类别"),
    Column("parent", "parent", "上级单位"),
    Column("supervisor_contact", "supervisor_contact", "监管联系人"),
)
DEVICE_COLUMNS = (
    Column("device_id", "device_id", "设备编号"),
    Column("model", "model", "型号"),
    Column("report_interval_s", "report_interval_s", "上报周期"),
    Column("cover_id", "cover_id", "井盖编号"),
    Column("source", "source", "来源"),
    Column("external_id", "external_id", "外部编号"),
)
PROBLEM_COLUMNS = (
    Column("case_id", "case_id", "案件编号"),
    Column("cover_id", "cover_id", "井盖编号"),
    Column("road", "road", "道路"),
    Column("unit_code", "unit_code", "权属单位代码"),
    Column("unit_name", "unit_name", "权属单位"),
    Column("kinds", "problem", "问题类型", translate=True),
    Column("severity", "severity", "紧急程度", translate=True),
    Column("status", "status", "状态", translate=True),
    Column("opened_at", "opened_at", "立案时间"),
    Column("dispatched_at", "dispatched_at", "派遣时间"),
    Column("acknowledged_at", "acknowledged_at", "接单时间"),
    Column("on_site_at", "on_site_at", "到场时间"),
    Column("resolved_at", "resolved_at", "处置完成时间"),
    Column("verified_at", "verified_at", "核查时间"),
    Column("closed_at", "closed_at", "结案时间"),
    Column("resolve_deadline", "resolve_deadline", "处置时限"),
    Column("overdue", "overdue", "是否超期"),
    Column("reopened", "reopened", "返工次数"),
    Column("cancel_reason", "cancel_reason", "作废原因"),
)
ACCEPTANCE_COLUMNS = (
    Column("case_id", "case_id", "案件编号"),
    Column("cover_id", "cover_id", "井盖编号"),
    Column("road", "road", "道路"),
    Column("unit_code", "unit_code", "权属单位代码"),
    Column("unit_name", "unit_name", "权属单位"),
    Column("kinds", "problem", "问题类型", translate=True),
    Column("status", "status", "状态", translate=True),
    Column("opened_at", "opened_at", "立案时间"),
    Column("resolved_at", "resolved_at", "整改完成时间"),
    Column("verified_at", "verified_at", "验收时间"),
    Column("verified_by", "verified_by", "验收人"),
    Column("closed_at", "closed_at", "销号时间"),
    Column("closed_by", "closed_by", "销号人"),
    Column("resolve_hours", "resolve_hours", "整改用时(小时)"),
)

# Rows come from the database in partitions of this many (server-side cursors): a
# partition is all a ledger holds at a time, whatever the size of the registry.
PARTITION = 500

AnySelect = Select[*tuple[Any, ...]]
AnyRow = Row[*tuple[Any, ...]]

# A table's rows, a partition at a time, as plain values keyed by column.
Rows = AsyncIterator[list[dict[str, Any]]]


@dataclass(slots=True)
class Sheet:
    """One table of a ledger: its columns, and its rows as they come from the database."""

    title_en: str
    title_zh: str
    columns: Sequence[Column]
    rows: Rows


# -- rows -------------------------------------------------------------------------------


async def _partitions(
    session: AsyncSession, query: AnySelect, shape: Callable[[AnyRow], dict[str, Any]]
) -> Rows:
    result = await session.stream(query.execution_options(yield_per=PARTITION))
    async for partition in result.partitions():
        yield [shape(row) for row in partition]


async def _one_partition(rows: list[dict[str, Any]]) -> Rows:
    yield rows


_OPEN_BINDING = and_(
    DeviceBindingRow.cover_id == CoverRow.cover_id, DeviceBindingRow.unbound_at.is_(None)
)


def _census_query(unit: str | None) -> AnySelect:
    # The census columns straight from SQL: one query, no model objects per cover.
    query = (
        select(
            *(getattr(CoverRow, c.key) for c in CENSUS_COLUMNS[:4]),
            RoadRow.name.label("road"),
            *(getattr(CoverRow, c.key) for c in CENSUS_COLUMNS[5:14]),
            DeviceBindingRow.device_id,
            DeviceRow.report_interval_s,
            DeviceRow.model,
            DeviceRow.source,
            DeviceRow.external_id,
        )
        .join(RoadRow, RoadRow.id == CoverRow.road_id)
        .outerjoin(DeviceBindingRow, _OPEN_BINDING)
        .outerjoin(DeviceRow, DeviceRow.device_id == DeviceBindingRow.device_id)
        .order_by(CoverRow.cover_id)
    )
    # covers.owner_unit is indexed (ix_covers_owner_unit).
    return query if unit is None else query.where(CoverRow.owner_unit == unit)


def _devices_query(unit: str | None) -> AnySelect:
    query = (
        select(
            DeviceRow.device_id,
            DeviceRow.model,
            DeviceRow.report_interval_s,
            DeviceBindingRow.cover_id,
            DeviceRow.source,
            DeviceRow.external_id,
        )
        .outerjoin(
            DeviceBindingRow,
            and_(
                DeviceBindingRow.device_id == DeviceRow.device_id,
                DeviceBindingRow.unbound_at.is_(None),
            ),
        )
        .order_by(DeviceRow.device_id)
    )
    if unit is None:
        return query
    # A unit's devices: those on its covers.
    return query.join(CoverRow, CoverRow.cover_id == DeviceBindingRow.cover_id).where(
        CoverRow.owner_unit == unit
    )


def _mapping(row: AnyRow) -> dict[str, Any]:
    return dict(row._mapping)


async def census_sheets(*, session: AsyncSession, unit: str | None) -> list[Sheet]:
    """Covers (the census file's columns), and the units and devices they refer to."""
    units: list[Unit] = await registry.list_units(session=session)
    unit_rows = [
        {**u.model_dump(include={c.key for c in UNIT_COLUMNS}), "kind": u.kind.value}
        for u in units
        if unit is None or u.code == unit
    ]
    return [
        Sheet(
            "covers", "井盖", CENSUS_COLUMNS, _partitions(session, _census_query(unit), _mapping)
        ),
        Sheet("units", "单位", UNIT_COLUMNS, _one_partition(unit_rows)),
        Sheet(
            "devices", "设备", DEVICE_COLUMNS, _partitions(session, _devices_query(unit), _mapping)
        ),
    ]


def _times(row: CaseRow, tz: ZoneInfo) -> dict[str, datetime | None]:
    times = row.state_times
    return {
        f"{state}_at": local(times.get(state), tz)
        for state in ("dispatched", "acknowledged", "on_site", "resolved", "verified", "closed")
    }


async def _unit_names(session: AsyncSession) -> dict[str, str]:
    return {u.code: u.name for u in await registry.list_units(session=session)}


def _case_columns(row: CaseRow, names: dict[str, str]) -> dict[str, Any]:
    """The columns both case ledgers start with: which case, where, whose, about what."""
    return {
        "case_id": row.id,
        "cover_id": row.cover_id,
        "road": row.road,
        "unit_code": row.unit_code,
        "unit_name": names.get(row.unit_code),
        "kinds": list(row.kinds),
    }


def _period(column: SQLColumnExpression[Any], start_ms: int | None, end_ms: int | None) -> Any:
    return and_(
        true() if start_ms is None else column >= start_ms,
        true() if end_ms is None else column < end_ms,
    )


async def problem_sheets(
    *,
    session: AsyncSession,
    unit: str | None,
    start_ms: int | None,
    end_ms: int | None,
    tz: ZoneInfo,
) -> list[Sheet]:
    """Every case opened in [start_ms, end_ms), oldest first."""
    names = await _unit_names(session)
    query = (
        select(CaseRow)
        .where(_period(CaseRow.opened_ms, start_ms, end_ms))
        .order_by(CaseRow.opened_ms, CaseRow.id)
    )
    if unit is not None:
        query = query.where(CaseRow.unit_code == unit)  # cases.unit_code is indexed

    def shape(found: AnyRow) -> dict[str, Any]:
        row: CaseRow = found[0]
        return {
            **_case_columns(row, names),
            "severity": row.severity,
            "status": row.status,
            "opened_at": local(row.opened_ms, tz),
            **_times(row, tz),
            "resolve_deadline": local(row.deadlines.get("resolved"), tz),
            "overdue": row.overdue,
            "reopened": row.reopened,
            "cancel_reason": row.cancel_reason,
        }

    rows = _partitions(session, query, shape)
    return [Sheet("problems", "问题井盖治理台账", PROBLEM_COLUMNS, rows)]


def _last_actor(to: CaseStatus) -> ScalarSelect[str]:
    """Who moved the case to `to` last (a correlated subquery)."""
    return (
        select(CaseEventRow.actor)
        .where(
            CaseEventRow.case_id == CaseRow.id,  # case_events.case_id is indexed
            CaseEventRow.action == "transition",
            CaseEventRow.to_status == to.value,
        )
        .order_by(CaseEventRow.at_ms.desc(), CaseEventRow.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def _acceptance_query(unit: str | None, start_ms: int | None, end_ms: int | None) -> AnySelect:
    # A float: milliseconds overflow PostgreSQL's integer, and a double holds them exactly.
    verified = CaseRow.state_times["verified"].as_float()
    done = (CaseStatus.VERIFIED.value, CaseStatus.CLOSED.value)
    query = (
        select(CaseRow, _last_actor(CaseStatus.VERIFIED), _last_actor(CaseStatus.CLOSED))
        .where(CaseRow.status.in_(done), _period(verified, start_ms, end_ms))
        .order_by(verified, CaseRow.id)
    )
    return query if unit is None else query.where(CaseRow.unit_code == unit)


async def acceptance_sheets(
    *,
    session: AsyncSession,
    unit: str | None,
    start_ms: int | None,
    end_ms: int | None,
    tz: ZoneInfo,
) -> list[Sheet]:
    """Verified and closed cases verified in [start_ms, end_ms), in order of verification."""
    names = await _unit_names(session)

    def shape(found: AnyRow) -> dict[str, Any]:
        row: CaseRow = found[0]
        resolved = row.state_times.get("resolved")
        return {
            **_case_columns(row, names),
            "status": row.status,
            "opened_at": local(row.opened_ms, tz),
            "resolved_at": local(resolved, tz),
            "verified_at": local(row.state_times.get("verified"), tz),
            "verified_by": found[1],
            "closed_at": local(row.state_times.get("closed"), tz),
            "closed_by": found[2],
            "resolve_hours": (
                round((resolved - row.opened_ms) / 3_600_000, 2) if resolved else None
            ),
        }

    rows = _partitions(session, _acceptance_query(unit, start_ms, end_ms), shape)
    return [Sheet("acceptance", "验收销号台账", ACCEPTANCE_COLUMNS, rows)]


# -- rendering --------------------------------------------------------------------------


def _word(value: str, lang: Lang) -> str:
    return _ZH_VALUES.get(value, value) if lang is Lang.ZH else value


def display(value: Any, column: Column, lang: Lang) -> Any:
    """A value as a ledger shows it (before CSV text or XLSX cell typing)."""
    if isinstance(value, bool):
        return ("是" if value else "否") if lang is Lang.ZH else ("true" if value else "false")
    if isinstance(value, list):
        return "; ".join(_word(str(v), lang) if column.translate else str(v) for v in value)
    if isinstance(value, str) and column.translate:
        return _word(value, lang)
    return value


# Spreadsheets run a cell starting with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str) and text.startswith(_FORMULA_START):
        return "'" + text  # shown as text, never evaluated
    return text


def heading(column: Column, lang: Lang) -> str:
    return column.zh if lang is Lang.ZH else column.en


def _csv_lines(rows: Iterable[list[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


async def csv_chunks(sheet: Sheet, lang: Lang) -> AsyncIterator[bytes]:
    """UTF-8 with a BOM (Excel then reads Chinese text right; the census import accepts
    it), a partition of rows per chunk, each sent as soon as it is read."""
    yield "\ufeff".encode() + _csv_lines([[heading(column, lang) for column in sheet.columns]])
    async for partition in sheet.rows:
        yield _csv_lines(
            [_csv_text(display(row.get(c.key), c, lang)) for c in sheet.columns]
            for row in partition
        )


def _cell(sheet: WriteOnlyWorksheet, value: Any) -> Any:
    if isinstance(value, datetime):
        # Excel has no time zones: the local wall time, as the heading's zone says.
        cell = WriteOnlyCell(sheet, value=value.replace(tzinfo=None))
        cell.number_format = "yyyy-mm-dd hh:mm:ss"
        return cell
    if isinstance(value, str):
        # XML 1.0 cannot hold most control characters: openpyxl refuses them.
        cell = WriteOnlyCell(sheet, value=ILLEGAL_CHARACTERS_RE.sub("\ufffd", value))
        cell.data_type = "s"  # openpyxl would store "=…" as a formula
        return cell
    return value


def _start_sheet(workbook: Workbook, sheet: Sheet, lang: Lang) -> WriteOnlyWorksheet:
    ws = workbook.create_sheet(sheet.title_zh if lang is Lang.ZH else sheet.title_en)
    assert isinstance(ws, WriteOnlyWorksheet)  # a write-only workbook makes no other
    bold = Font(bold=True)
    header = []
    for column in sheet.columns:
        cell = WriteOnlyCell(ws, value=heading(column, lang))
        cell.font = bold
        header.append(cell)
    ws.append(header)
    return ws


def _append(
    ws: WriteOnlyWorksheet, columns: Sequence[Column], rows: list[dict[str, Any]], lang: Lang
) -> None:
    for row in rows:
        ws.append([_cell(ws, display(row.get(c.key), c, lang)) for c in columns])


def _save(workbook: Workbook, out: BinaryIO) -> None:
    workbook.save(out)
    logger.debug("ledger workbook written: %d bytes", out.tell())


async def write_xlsx(sheets: Sequence[Sheet], lang: Lang, out: BinaryIO) -> None:
    """The workbook into `out`. Rows are read here, a partition at a time; cells are made
    and written in a worker thread (the event loop also runs ingest and alerting): a
    write-only workbook keeps each sheet in a temporary file, not in memory."""
    workbook = Workbook(write_only=True)
    for sheet in sheets:
        ws = await asyncio.to_thread(_start_sheet, workbook, sheet, lang)
        async for partition in sheet.rows:
            await asyncio.to_thread(_append, ws, sheet.columns, partition, lang)
    await asyncio.to_thread(_save, workbook, out)
