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

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font
from openpyxl.worksheet._write_only import WriteOnlyWorksheet
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import CaseEventRow, CaseRow, CaseStatus
from api.periods import local
from core import registry
from core.registry_schemas import Cover, Device, Unit


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


@dataclass(slots=True)
class Sheet:
    """One table of a ledger: its columns and rows of plain values (keyed by column)."""

    title_en: str
    title_zh: str
    columns: Sequence[Column]
    rows: list[dict[str, Any]]


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

# Read the registry in pages of this many rows (its functions are paged).
_PAGE = 1000


# -- rows -------------------------------------------------------------------------------


async def _all_covers(session: AsyncSession, unit: str | None) -> list[Cover]:
    covers: list[Cover] = []
    while True:
        page = await registry.list_covers(
            session=session, owner_unit=unit, limit=_PAGE, offset=len(covers)
        )
        covers += page
        if len(page) < _PAGE:
            return covers


async def _all_devices(session: AsyncSession) -> list[Device]:
    devices: list[Device] = []
    while True:
        page = await registry.list_devices(session=session, limit=_PAGE, offset=len(devices))
        devices += page
        if len(page) < _PAGE:
            return devices


async def census_sheets(*, session: AsyncSession, unit: str | None) -> list[Sheet]:
    """Covers (the census file's columns), and the units and devices they refer to."""
    covers = await _all_covers(session, unit)
    devices = await _all_devices(session)
    intervals = {device.device_id: device.report_interval_s for device in devices}
    cover_rows = [
        {
            **cover.model_dump(include={c.key for c in CENSUS_COLUMNS}),
            "state": cover.state.value,
            "report_interval_s": intervals.get(cover.device_id) if cover.device_id else None,
        }
        for cover in covers
    ]
    units: list[Unit] = await registry.list_units(session=session)
    if unit is not None:
        devices = [d for d in devices if d.cover_id in {c.cover_id for c in covers}]
        units = [u for u in units if u.code == unit]
    unit_rows = [
        {**u.model_dump(include={c.key for c in UNIT_COLUMNS}), "kind": u.kind.value} for u in units
    ]
    device_rows = [d.model_dump(include={c.key for c in DEVICE_COLUMNS}) for d in devices]
    return [
        Sheet("covers", "井盖", CENSUS_COLUMNS, cover_rows),
        Sheet("units", "单位", UNIT_COLUMNS, unit_rows),
        Sheet("devices", "设备", DEVICE_COLUMNS, device_rows),
    ]


def _times(row: CaseRow, tz: ZoneInfo) -> dict[str, datetime | None]:
    times = row.state_times
    return {
        f"{state}_at": local(times.get(state), tz)
        for state in ("dispatched", "acknowledged", "on_site", "resolved", "verified", "closed")
    }


async def _cases(
    session: AsyncSession, unit: str | None, statuses: Sequence[str] | None
) -> list[CaseRow]:
    query = select(CaseRow).order_by(CaseRow.opened_ms, CaseRow.id)
    if unit is not None:
        query = query.where(CaseRow.unit_code == unit)
    if statuses is not None:
        query = query.where(CaseRow.status.in_(statuses))
    return list(await session.scalars(query))


async def _unit_names(session: AsyncSession) -> dict[str, str]:
    return {u.code: u.name for u in await registry.list_units(session=session)}


def _within(ms: int | None, start_ms: int | None, end_ms: int | None) -> bool:
    if ms is None:
        return False
    return (start_ms is None or ms >= start_ms) and (end_ms is None or ms < end_ms)


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
    rows = [
        {
            "case_id": row.id,
            "cover_id": row.cover_id,
            "road": row.road,
            "unit_code": row.unit_code,
            "unit_name": names.get(row.unit_code),
            "kinds": list(row.kinds),
            "severity": row.severity,
            "status": row.status,
            "opened_at": local(row.opened_ms, tz),
            **_times(row, tz),
            "resolve_deadline": local(row.deadlines.get("resolved"), tz),
            "overdue": row.overdue,
            "reopened": row.reopened,
            "cancel_reason": row.cancel_reason,
        }
        for row in await _cases(session, unit, None)
        if _within(row.opened_ms, start_ms, end_ms)
    ]
    return [Sheet("problems", "问题井盖治理台账", PROBLEM_COLUMNS, rows)]


async def _last_actors(session: AsyncSession, case_ids: list[int]) -> dict[tuple[int, str], str]:
    """(case, state) → who moved the case there last."""
    if not case_ids:
        return {}
    events = await session.execute(
        select(CaseEventRow.case_id, CaseEventRow.to_status, CaseEventRow.actor)
        .where(
            CaseEventRow.case_id.in_(case_ids),
            CaseEventRow.action == "transition",
            CaseEventRow.to_status.in_((CaseStatus.VERIFIED.value, CaseStatus.CLOSED.value)),
        )
        .order_by(CaseEventRow.at_ms, CaseEventRow.id)
    )
    return {(case_id, str(to)): actor for case_id, to, actor in events}


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
    done = (CaseStatus.VERIFIED.value, CaseStatus.CLOSED.value)
    cases = [
        row
        for row in await _cases(session, unit, done)
        if _within(row.state_times.get("verified"), start_ms, end_ms)
    ]
    cases.sort(key=lambda row: (row.state_times["verified"], row.id))
    actors = await _last_actors(session, [row.id for row in cases])
    rows = []
    for row in cases:
        resolved = row.state_times.get("resolved")
        rows.append(
            {
                "case_id": row.id,
                "cover_id": row.cover_id,
                "road": row.road,
                "unit_code": row.unit_code,
                "unit_name": names.get(row.unit_code),
                "kinds": list(row.kinds),
                "status": row.status,
                "opened_at": local(row.opened_ms, tz),
                "resolved_at": local(resolved, tz),
                "verified_at": local(row.state_times.get("verified"), tz),
                "verified_by": actors.get((row.id, "verified")),
                "closed_at": local(row.state_times.get("closed"), tz),
                "closed_by": actors.get((row.id, "closed")),
                "resolve_hours": (
                    round((resolved - row.opened_ms) / 3_600_000, 2) if resolved else None
                ),
            }
        )
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


def render_csv(sheet: Sheet, lang: Lang) -> bytes:
    """UTF-8 with a BOM: Excel then reads Chinese text right; the census import accepts it."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([heading(column, lang) for column in sheet.columns])
    for row in sheet.rows:
        writer.writerow([_csv_text(display(row.get(c.key), c, lang)) for c in sheet.columns])
    return ("\ufeff" + out.getvalue()).encode()


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


def render_xlsx(sheets: Sequence[Sheet], lang: Lang) -> bytes:
    workbook = Workbook(write_only=True)
    for sheet in sheets:
        ws = workbook.create_sheet(sheet.title_zh if lang is Lang.ZH else sheet.title_en)
        bold = Font(bold=True)
        header = []
        for column in sheet.columns:
            cell = WriteOnlyCell(ws, value=heading(column, lang))
            cell.font = bold
            header.append(cell)
        ws.append(header)
        for row in sheet.rows:
            ws.append([_cell(ws, display(row.get(c.key), c, lang)) for c in sheet.columns])
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()
