"""Census import (普查台账, DESIGN §11): CSV or XLSX, English or Chinese headers, upsert.

The rules:

- Row 1 holds the headers, English or Chinese (either, per column); row numbers in the
  report are those a spreadsheet shows, the header being row 1. Entirely blank rows
  are skipped. Unknown columns are an error unless `ignore_unknown`.
- Every problem is reported as (row, column, reason), all of them, not only the first
  of a row. A file with any rejected row imports nothing, unless `skip_invalid`: then the
  valid rows are imported and the rejected ones reported. Header problems (missing or
  unknown columns) always reject the whole file.
- Rows are upserted by cover number. On an update, a column absent from the file leaves
  that field as it was, while an empty cell means "none" (or the default). Per-cover
  thresholds, which the census does not carry, are never touched.
- `device_id` binds that device to the cover (created when new; moved or replacing, as
  `registry.bind_device` does); an empty cell leaves the cover's device as it is. The
  device's `model`, `source` and `external_id` (DESIGN §12) are set when given; an empty
  cell leaves them as they are.
- Everything is written in the caller's transaction, in bulk; `dry_run` writes nothing
  and reports what an import would do.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import math
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

from openpyxl import load_workbook
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.db import Base, utcnow
from core.registry import bump_version, resolve_owner
from core.registry_errors import Conflict, Invalid
from core.registry_models import CoverRow, DeviceBindingRow, DeviceRow, RoadRow, UnitRow
from core.registry_schemas import (
    DEFAULT_REPORT_INTERVAL_S,
    CoverNumber,
    CoverState,
    DepthCm,
    DeviceId,
    EndReason,
    ExternalId,
    KindCode,
    Latitude,
    Longitude,
    ReportInterval,
    ShortText,
    SourceName,
    UnitCode,
    kind_code_of,
)

logger = logging.getLogger(__name__)

# Rows per executemany: big enough to amortise round trips, small enough that one
# statement's parameters stay well under PostgreSQL's 32767-parameter limit.
_CHUNK = 2000
_XLSX_MAGIC = b"PK\x03\x04"


class CensusFileError(Invalid):
    """The file cannot be read as a census at all (format, encoding, headers)."""

    def __init__(self, reason: str, errors: list[RowError] | None = None) -> None:
        super().__init__("file", reason)
        self.errors = errors or []


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem: spreadsheet row number, the column's header as in the file, why."""

    row: int
    column: str | None
    reason: str


@dataclass(slots=True)
class CensusReport:
    """What an import did (or, on a dry run or a rejected file, would have done)."""

    rows: int = 0  # data rows read (blank rows not counted)
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    roads_created: int = 0
    devices_created: int = 0
    devices_updated: int = 0
    bindings_made: int = 0
    bindings_ended: int = 0  # a sensor replaced on its cover, or moved to another
    rejected_rows: int = 0
    errors: list[RowError] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)
    dry_run: bool = False
    committed: bool = False  # whether anything was written


# -- columns ----------------------------------------------------------------------------


class _CellError(ValueError):
    """A cell's value is not acceptable; the message is the reason shown to the user."""


def _validator(annotation: Any) -> Callable[[Any], Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def validate(value: Any) -> Any:
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            # Our own validators' messages, without pydantic's "Value error, " in front.
            cause = error.get("ctx", {}).get("error")
            raise _CellError(str(cause) if cause is not None else error["msg"]) from None

    return validate


def _number(text: str) -> float:
    try:
        value = float(text.replace(",", "."))
    except ValueError:
        raise _CellError(f"{text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise _CellError(f"{text[:40]!r} is not a finite number")
    return value


def _integer(text: str) -> int:
    value = _number(text)
    if not value.is_integer():
        raise _CellError(f"{text[:40]!r} is not a whole number")
    return int(value)


_TRUE = frozenset({"1", "true", "是", "yes", "y"})
_FALSE = frozenset({"0", "false", "否", "no", "n"})


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _CellError(f"{text[:40]!r} is not 1/0, true/false or 是/否")


_STATES = {
    **{state.value: state for state in CoverState},
    "在用": CoverState.IN_SERVICE,
    "废弃": CoverState.ABANDONED,
    "已填埋": CoverState.FILLED,
}
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _state(text: str) -> str:
    state = _STATES.get(text.lower())
    if state is None:
        raise _CellError(f"{text[:40]!r} is not in_service/在用, abandoned/废弃 or filled/已填埋")
    return state.value


def _date(text: str) -> date:
    if not _ISO_DATE.match(text):
        raise _CellError(f"{text[:40]!r} is not a date as YYYY-MM-DD")
    try:
        value = date.fromisoformat(text)
    except ValueError as exc:
        raise _CellError(f"{text}: {exc}") from None
    if value > date.today():
        raise _CellError(f"{text} is in the future")
    return value


@dataclass(frozen=True, slots=True)
class _Column:
    field: str  # English header, and the name of the cover's field
    chinese: str
    required: bool
    parse: Callable[[str], Any]


_text = _validator(ShortText)
_longitude = _validator(Longitude)
_latitude = _validator(Latitude)
_depth = _validator(DepthCm)
_interval = _validator(ReportInterval)
_COLUMNS = (
    _Column("cover_id", "编号", True, _validator(CoverNumber)),
    _Column("kind_code", "类别代码", True, _validator(KindCode)),
    _Column("owner_unit", "权属单位", True, _validator(UnitCode)),
    _Column("maintainer_unit", "养护单位", False, _validator(UnitCode)),
    _Column("road", "道路", True, _text),
    _Column("grid", "网格", False, _text),
    _Column("lon", "经度", True, lambda text: _longitude(_number(text))),
    _Column("lat", "纬度", True, lambda text: _latitude(_number(text))),
    _Column("depth_cm", "井深", False, lambda text: _depth(_number(text))),
    _Column("material", "材质", False, _text),
    _Column("installed_on", "安装日期", False, _date),
    _Column("flood_prone", "易涝点", False, _flag),
    _Column("anti_fall", "防坠网", False, _flag),
    _Column("state", "状态", False, _state),
    _Column("device_id", "设备编号", False, _validator(DeviceId)),
    _Column("report_interval_s", "上报周期", False, lambda text: _interval(_integer(text))),
    _Column("model", "型号", False, _text),
    _Column("source", "来源", False, _validator(SourceName)),
    _Column("external_id", "外部编号", False, _validator(ExternalId)),
)
# The device's own columns: each needs a device_id on its row.
_DEVICE_FIELDS = ("report_interval_s", "model", "source", "external_id")
_BY_HEADER = {
    **{column.field: column for column in _COLUMNS},
    **{column.chinese: column for column in _COLUMNS},
}
# Cover fields written as the file gives them (the others are derived or not covers').
_COVER_FIELDS = (
    "maintainer_unit",
    "grid",
    "lon",
    "lat",
    "depth_cm",
    "material",
    "installed_on",
    "flood_prone",
    "anti_fall",
    "state",
)
_DEFAULTS: dict[str, Any] = {"flood_prone": False, "anti_fall": False, "state": "in_service"}


# -- reading files ----------------------------------------------------------------------


@dataclass(slots=True)
class CensusTable:
    """A census file's header and its rows, read lazily: (row number, cell values)."""

    header: list[str]
    rows: Iterator[tuple[int, list[Any]]]


def read_census(data: bytes) -> CensusTable:
    """Opens a census file's bytes: XLSX when it is a zip archive, else UTF-8 CSV."""
    if data.startswith(_XLSX_MAGIC):
        return _read_xlsx(data)
    return _read_csv(data)


def read_census_file(path: Path) -> CensusTable:
    return read_census(path.read_bytes())


def _read_csv(data: bytes) -> CensusTable:
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader, None)
    except UnicodeDecodeError as exc:
        raise _not_utf8(data, exc) from None
    except csv.Error as exc:
        raise CensusFileError(f"not a CSV file: {exc}") from None
    if header is None:
        raise CensusFileError("the file is empty")
    return CensusTable(header, _csv_rows(reader, data))


def _csv_rows(reader: Iterator[list[str]], data: bytes) -> Iterator[tuple[int, list[Any]]]:
    number = 1
    try:
        for number, cells in enumerate(reader, start=2):
            yield number, list(cells)
    except UnicodeDecodeError as exc:
        raise _not_utf8(data, exc) from None
    except csv.Error as exc:
        raise CensusFileError(f"row {number + 1}: not valid CSV: {exc}") from None


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> CensusFileError:
    # The decoder works in blocks, so its offset is into a block: find the bad byte.
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as whole:
        exc = whole
    row = data[: exc.start].count(b"\n") + 1
    reason = (
        f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file"
        " as 'CSV UTF-8' or as XLSX"
    )
    return CensusFileError(reason, [RowError(row, None, reason)])


def _read_xlsx(data: bytes) -> CensusTable:
    try:
        book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise CensusFileError(f"not a readable XLSX file: {exc}") from None
    sheet = book.worksheets[0]
    rows = sheet.iter_rows(values_only=True)
    first = next(rows, None)
    if first is None:
        book.close()
        raise CensusFileError("the first sheet is empty")
    header = ["" if cell is None else str(cell) for cell in first]
    return CensusTable(header, _xlsx_rows(rows, book))


def _xlsx_rows(rows: Iterator[tuple[Any, ...]], book: Any) -> Iterator[tuple[int, list[Any]]]:
    try:
        for number, cells in enumerate(rows, start=2):
            yield number, list(cells)
    finally:
        book.close()


def _cell_text(column: _Column, value: Any) -> str:
    """A cell as text; spreadsheet numbers and dates are turned back into what was meant."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, datetime | date):
        return value.strftime("%Y-%m-%d")
    if isinstance(value, int | float):
        if column.field == "cover_id":
            raise _CellError(
                "stored as a number, which spreadsheets keep to 15 significant digits:"
                " format the column as text and enter the numbers again"
            )
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if column.field == "kind_code" and isinstance(value, int):
            return f"{value:04d}"  # 0102 typed into a number cell became 102
        return str(value)
    return str(value).strip()


# -- headers ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Layout:
    """Which column of the file holds which field, and what the header said."""

    positions: list[tuple[int, _Column, str]]  # (index, column, header as written)
    width: int  # columns up to the last non-empty header
    ignored: list[str]

    @property
    def present(self) -> frozenset[str]:
        return frozenset(column.field for _, column, _ in self.positions)


def _layout(header: list[str], *, ignore_unknown: bool) -> _Layout:
    names = [name.strip().lstrip("\ufeff") for name in header]
    while names and not names[-1]:
        names.pop()  # spreadsheets report formatted but empty trailing columns
    positions: list[tuple[int, _Column, str]] = []
    errors: list[RowError] = []
    ignored: list[str] = []
    seen: dict[str, str] = {}
    for index, name in enumerate(names):
        column = _BY_HEADER.get(name) or _BY_HEADER.get(name.lower())
        if column is None:
            label = name or f"(column {index + 1} has no header)"
            if ignore_unknown:
                ignored.append(label)
            else:
                errors.append(RowError(1, label, "unknown column (see DESIGN §11)"))
        elif column.field in seen:
            errors.append(RowError(1, name, f"same column as {seen[column.field]!r}"))
        else:
            seen[column.field] = name
            positions.append((index, column, name))
    for column in _COLUMNS:
        if column.required and column.field not in seen:
            errors.append(
                RowError(1, f"{column.field} / {column.chinese}", "required column missing")
            )
    if errors:
        raise CensusFileError("the header row is not a census header", errors)
    return _Layout(positions, len(names), ignored)


# -- rows -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Row:
    number: int
    values: dict[str, Any]  # field → parsed value; None for an empty cell


def _parse_row(number: int, cells: list[Any], layout: _Layout) -> tuple[_Row, list[RowError]]:
    values: dict[str, Any] = {}
    errors: list[RowError] = []
    for index, column, header in layout.positions:
        raw = cells[index] if index < len(cells) else None
        try:
            text = _cell_text(column, raw)
            values[column.field] = column.parse(text) if text else None
        except _CellError as exc:
            errors.append(RowError(number, header, str(exc)))
            continue
        if text == "" and column.required and column.field != "owner_unit":
            errors.append(RowError(number, header, "required, but empty"))
    if any(_cell_text(_EXTRA, cell) for cell in cells[layout.width :]):
        errors.append(RowError(number, None, "values beyond the last column with a header"))
    return _Row(number, values), errors


# Stands for the cells right of the last header, which only need to be empty.
_EXTRA = _Column("", "", False, str)


def _header(layout: _Layout, name: str) -> str:
    for _, column, header in layout.positions:
        if column.field == name:
            return header
    return name


class _Interner:
    """One shared object per distinct value: a census repeats roads, units and materials."""

    def __init__(self) -> None:
        self._seen: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        return self._seen.setdefault(value, value) if isinstance(value, str) else value


@dataclass(slots=True)
class _Registry:
    """What the import checks rows against, read once at the start of the transaction."""

    unit_kinds: dict[str, str]
    roads: dict[str, tuple[int, str | None]]  # name → (id, township unit)
    covers: dict[str, tuple[Any, ...]]  # cover_id → the stored values of _STORED
    devices: dict[str, _DeviceValues]  # device_id → what is stored
    external_ids: dict[tuple[str, str], str]  # (source, external id) → device_id
    open_by_device: dict[str, tuple[int, str]]  # device_id → (binding id, cover_id)
    open_by_cover: dict[str, tuple[int, str]]  # cover_id → (binding id, device_id)


_STORED = ("kind_code", "owner_unit", "road_id", *_COVER_FIELDS)


async def _load_registry(session: AsyncSession) -> _Registry:
    units = dict((await session.execute(select(UnitRow.code, UnitRow.kind))).all())
    roads = {
        name: (road_id, township)
        for road_id, name, township in await session.execute(
            select(RoadRow.id, RoadRow.name, RoadRow.township_unit)
        )
    }
    stored = [getattr(CoverRow, name) for name in _STORED]
    intern = _Interner()
    covers = {
        row[0]: tuple(intern(value) for value in row[1:])
        for row in await session.execute(select(CoverRow.cover_id, *stored))
    }
    devices: dict[str, _DeviceValues] = {}
    external_ids: dict[tuple[str, str], str] = {}
    columns = (DeviceRow.report_interval_s, DeviceRow.model, DeviceRow.source)
    for device_id, *stored in await session.execute(
        select(DeviceRow.device_id, *columns, DeviceRow.external_id)
    ):
        devices[device_id] = _DeviceValues(*stored)
        if stored[2] is not None and stored[3] is not None:
            external_ids[(stored[2], stored[3])] = device_id
    open_rows = await session.execute(
        select(DeviceBindingRow.id, DeviceBindingRow.device_id, DeviceBindingRow.cover_id).where(
            DeviceBindingRow.unbound_at.is_(None)
        )
    )
    by_device: dict[str, tuple[int, str]] = {}
    by_cover: dict[str, tuple[int, str]] = {}
    for binding_id, device_id, cover_id in open_rows:
        by_device[device_id] = (binding_id, cover_id)
        by_cover[cover_id] = (binding_id, device_id)
    return _Registry(units, roads, covers, devices, external_ids, by_device, by_cover)


class _Checker:
    """Row rules that need the whole file or the registry: duplicates, units, owners."""

    def __init__(self, registry: _Registry, layout: _Layout) -> None:
        self.registry = registry
        self.layout = layout
        self.cover_rows: dict[str, int] = {}
        self.device_rows: dict[str, int] = {}
        self.external_id_rows: dict[tuple[str, str], int] = {}

    def check(self, row: _Row) -> list[RowError]:
        values = row.values
        errors: list[RowError] = []
        cover_id = values.get("cover_id")
        if cover_id is not None:
            errors += self._cover(row, cover_id)
        maintainer = values.get("maintainer_unit")
        if maintainer is not None and maintainer not in self.registry.unit_kinds:
            errors.append(
                self._error(row, "maintainer_unit", f"unit {maintainer!r} does not exist")
            )
        errors += self._device(row)
        return errors

    def _error(self, row: _Row, name: str, reason: str) -> RowError:
        return RowError(row.number, _header(self.layout, name), reason)

    def _cover(self, row: _Row, cover_id: str) -> list[RowError]:
        errors: list[RowError] = []
        first = self.cover_rows.setdefault(cover_id, row.number)
        if first != row.number:
            errors.append(self._error(row, "cover_id", f"{cover_id} is also in row {first}"))
        kind_code = row.values.get("kind_code")
        if kind_code is not None and kind_code != kind_code_of(cover_id):
            errors.append(
                self._error(
                    row,
                    "kind_code",
                    f"{kind_code} differs from the class in the cover number"
                    f" ({kind_code_of(cover_id)})",
                )
            )
        road = row.values.get("road")
        # An owner cell that did not parse has been reported already.
        if road is not None and "owner_unit" in row.values:
            township = self.registry.roads.get(road, (0, None))[1]
            try:
                row.values["owner_unit"] = resolve_owner(
                    cover_id=cover_id,
                    owner=row.values.get("owner_unit"),
                    unit_kinds=self.registry.unit_kinds,
                    road=road,
                    road_township=township,
                )
            except Invalid as exc:
                errors.append(self._error(row, exc.field, exc.reason))
        return errors

    def _device(self, row: _Row) -> list[RowError]:
        device_id = row.values.get("device_id")
        if device_id is None:
            return [
                self._error(row, name, "given without a device_id")
                for name in _DEVICE_FIELDS
                if row.values.get(name) is not None
            ]
        first = self.device_rows.setdefault(device_id, row.number)
        if first != row.number:
            return [self._error(row, "device_id", f"{device_id} is also in row {first}")]
        return self._external_id(row, device_id)

    def _external_id(self, row: _Row, device_id: str) -> list[RowError]:
        """One device per id on a source, in the file and in the registry."""
        stored = self.registry.devices.get(device_id)
        source = row.values.get("source") or (stored.source if stored else None)
        external_id = row.values.get("external_id") or (stored.external_id if stored else None)
        if source is None or external_id is None:
            return []
        key = (source, external_id)
        first = self.external_id_rows.setdefault(key, row.number)
        if first != row.number:
            return [self._error(row, "external_id", f"{external_id} is also in row {first}")]
        holder = self.registry.external_ids.get(key, device_id)
        if holder != device_id:
            return [
                self._error(row, "external_id", f"{source} id {external_id!r} is {holder}'s")
            ]
        return []


# -- the plan and its writing -----------------------------------------------------------

# The values a _Cover carries, in order: the derived class, the owner, the file's fields.
_VALUES = ("kind_code", "owner_unit", *_COVER_FIELDS)


@dataclass(frozen=True, slots=True)
class _Cover:
    """A valid row, compact: a whole census waits in memory until it is written."""

    cover_id: str
    road: str
    values: tuple[Any, ...]  # as _VALUES, defaults applied to empty cells
    device_id: str | None
    device: _DeviceValues  # the file's device columns; None: not given


@dataclass(frozen=True, slots=True)
class _DeviceValues:
    report_interval_s: int | None
    model: str | None
    source: str | None
    external_id: str | None

    def over(self, stored: _DeviceValues) -> _DeviceValues:
        """These values where given, the stored ones elsewhere."""
        return _DeviceValues(
            *(
                mine if mine is not None else theirs
                for mine, theirs in zip(_astuple(self), _astuple(stored), strict=True)
            )
        )


def _astuple(values: _DeviceValues) -> tuple[Any, ...]:
    return (values.report_interval_s, values.model, values.source, values.external_id)


_NO_DEVICE_VALUES = _DeviceValues(DEFAULT_REPORT_INTERVAL_S, None, None, None)


def _compact(row: _Row, intern: _Interner) -> _Cover:
    values = row.values
    cover_id = values["cover_id"]
    fields = [kind_code_of(cover_id), values["owner_unit"]]
    fields += [_or_default(name, values.get(name)) for name in _COVER_FIELDS]
    return _Cover(
        cover_id=cover_id,
        road=intern(values["road"]),
        values=tuple(intern(value) for value in fields),
        device_id=values.get("device_id"),
        device=_DeviceValues(*(values.get(name) for name in _DEVICE_FIELDS)),
    )


def _or_default(name: str, value: Any) -> Any:
    return _DEFAULTS.get(name) if value is None else value


@dataclass(slots=True)
class _Plan:
    written: tuple[str, ...]  # the cover fields an update writes: the file's columns
    new_roads: list[str] = field(default_factory=list)
    inserts: list[_Cover] = field(default_factory=list)
    updates: list[_Cover] = field(default_factory=list)
    unchanged: int = 0
    new_devices: list[tuple[str, _DeviceValues]] = field(default_factory=list)
    device_updates: list[tuple[str, _DeviceValues]] = field(default_factory=list)
    bindings: list[tuple[str, str]] = field(default_factory=list)  # (device_id, cover_id)

    @property
    def empty(self) -> bool:
        return not (
            self.inserts or self.updates or self.new_devices or self.device_updates or self.bindings
        )


def _plan(covers: list[_Cover], registry: _Registry, present: frozenset[str]) -> _Plan:
    plan = _Plan(written=tuple(name for name in _COVER_FIELDS if name in present))
    for road in dict.fromkeys(cover.road for cover in covers):
        if road not in registry.roads:
            plan.new_roads.append(road)
            # A placeholder id; the real one is known once the road is inserted.
            registry.roads[road] = (-len(plan.new_roads), None)
    # Positions of the compared fields in a _Cover's values and in a stored row.
    compared = [(_VALUES.index(name), _STORED.index(name)) for name in _VALUES[:2] + plan.written]
    road_at = _STORED.index("road_id")
    for cover in covers:
        stored = registry.covers.get(cover.cover_id)
        if stored is None:
            plan.inserts.append(cover)
        elif stored[road_at] == registry.roads[cover.road][0] and all(
            cover.values[mine] == stored[theirs] for mine, theirs in compared
        ):
            plan.unchanged += 1
        else:
            plan.updates.append(cover)
        _plan_device(plan, cover, registry)
    return plan


def _plan_device(plan: _Plan, cover: _Cover, registry: _Registry) -> None:
    if cover.device_id is None:
        return
    known = registry.devices.get(cover.device_id)
    if known is None:
        plan.new_devices.append((cover.device_id, cover.device.over(_NO_DEVICE_VALUES)))
    elif (merged := cover.device.over(known)) != known:
        plan.device_updates.append((cover.device_id, merged))
    current = registry.open_by_device.get(cover.device_id)
    if current is None or current[1] != cover.cover_id:
        plan.bindings.append((cover.device_id, cover.cover_id))


def _device_columns(values: _DeviceValues) -> dict[str, Any]:
    return dict(zip(_DEVICE_FIELDS, _astuple(values), strict=True))


def _table(model: type[Base]) -> Table:
    return Base.metadata.tables[model.__tablename__]


_Item = TypeVar("_Item")


async def _execute_chunked(
    session: AsyncSession,
    statement: Any,
    items: Sequence[_Item],
    parameters: Callable[[_Item], dict[str, Any]],
) -> None:
    """executemany in chunks; the parameter dicts exist one chunk at a time."""
    for start in range(0, len(items), _CHUNK):
        chunk = [parameters(item) for item in items[start : start + _CHUNK]]
        await session.execute(statement, chunk)


async def _road_ids(session: AsyncSession, plan: _Plan, registry: _Registry) -> dict[str, int]:
    now = utcnow()
    await _execute_chunked(
        session,
        insert(_table(RoadRow)),
        plan.new_roads,
        lambda name: {"name": name, "created_at": now},
    )
    ids = {name: road_id for name, (road_id, _) in registry.roads.items()}
    if plan.new_roads:
        found = await session.execute(
            select(RoadRow.name, RoadRow.id).where(RoadRow.name.in_(plan.new_roads))
        )
        ids.update(dict(found.all()))
    return ids


async def _write(session: AsyncSession, plan: _Plan, registry: _Registry) -> None:
    now = utcnow()
    road_ids = await _road_ids(session, plan, registry)
    covers = _table(CoverRow)

    def inserted(cover: _Cover) -> dict[str, Any]:
        return {
            "cover_id": cover.cover_id,
            "road_id": road_ids[cover.road],
            "created_at": now,
            "updated_at": now,
            **dict(zip(_VALUES, cover.values, strict=True)),
        }

    await _execute_chunked(session, insert(covers), plan.inserts, inserted)
    changed = ("kind_code", "owner_unit", *plan.written)
    positions = [_VALUES.index(name) for name in changed]

    def updated(cover: _Cover) -> dict[str, Any]:
        values = {name: cover.values[at] for name, at in zip(changed, positions, strict=True)}
        return {"b_cover_id": cover.cover_id, "road_id": road_ids[cover.road], **values}

    statement = (
        update(covers)
        .where(covers.c.cover_id == bindparam("b_cover_id"))
        .values(
            road_id=bindparam("road_id"),
            updated_at=now,
            **{name: bindparam(name) for name in changed},
        )
    )
    await _execute_chunked(session, statement, plan.updates, updated)
    await _write_devices(session, plan, registry, now)
    await bump_version(session=session)


async def _write_devices(
    session: AsyncSession, plan: _Plan, registry: _Registry, now: datetime
) -> None:
    devices = _table(DeviceRow)
    await _execute_chunked(
        session,
        insert(devices),
        plan.new_devices,
        lambda new: {
            "device_id": new[0],
            **_device_columns(new[1]),
            "created_at": now,
            "updated_at": now,
        },
    )
    statement = (
        update(devices)
        .where(devices.c.device_id == bindparam("b_device_id"))
        .values(**{name: bindparam(name) for name in _DEVICE_FIELDS}, updated_at=now)
    )
    await _execute_chunked(
        session,
        statement,
        plan.device_updates,
        lambda change: {"b_device_id": change[0], **_device_columns(change[1])},
    )
    bindings = _table(DeviceBindingRow)
    # Ended first: the unique index on open bindings would refuse the new ones.
    statement = (
        update(bindings)
        .where(bindings.c.id == bindparam("b_id"))
        .values(unbound_at=now, end_reason=bindparam("end_reason"))
    )
    ended = list(_ended_bindings(plan, registry).items())
    await _execute_chunked(
        session, statement, ended, lambda end: {"b_id": end[0], "end_reason": end[1]}
    )
    await _execute_chunked(
        session,
        insert(bindings),
        plan.bindings,
        lambda bound: {"device_id": bound[0], "cover_id": bound[1], "bound_at": now},
    )


def _ended_bindings(plan: _Plan, registry: _Registry) -> dict[int, str]:
    """Binding id → why it ends, for the open bindings the new ones replace."""
    # A device that moves here from a cover that gets another device ends both ways at
    # once: "moved" says more (the device lives on elsewhere).
    ended: dict[int, str] = {}
    for device_id, _ in plan.bindings:
        moved = registry.open_by_device.get(device_id)
        if moved is not None:
            ended[moved[0]] = EndReason.MOVED.value
    for device_id, cover_id in plan.bindings:
        replaced = registry.open_by_cover.get(cover_id)
        if replaced is not None and replaced[1] != device_id:
            ended.setdefault(replaced[0], EndReason.REPLACED.value)
    return ended


# -- the import -------------------------------------------------------------------------


async def import_census(
    *,
    session: AsyncSession,
    table: CensusTable,
    ignore_unknown: bool = False,
    dry_run: bool = False,
    skip_invalid: bool = False,
) -> CensusReport:
    """Validates every row, then writes all of them in bulk, or none (see the module rules).

    Raises CensusFileError when the file as a whole is unusable; row problems are in the
    report. Writes happen in the caller's transaction, which the caller commits.
    """
    layout = _layout(table.header, ignore_unknown=ignore_unknown)
    registry = await _load_registry(session)
    report = CensusReport(dry_run=dry_run, ignored_columns=layout.ignored)
    # Checking a city's rows is seconds of CPU: in a thread, so the event loop that
    # evaluates alarms in the same process is not held up (the registry is our own copy).
    plan = await asyncio.to_thread(_check_and_plan, table, layout, registry, report, skip_invalid)
    if plan is None:
        logger.info("census rejected: %d of %d rows", report.rejected_rows, report.rows)
        return report
    if not dry_run and not plan.empty:
        try:
            await _write(session, plan, registry)
        except IntegrityError as exc:
            # Someone else wrote the same cover, device or road since we read the registry.
            reason = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
            raise Conflict("census", "import", f"changed meanwhile: {reason}") from exc
        report.committed = True
    logger.info(
        "census %s: %d rows, %d inserted, %d updated, %d unchanged, %d rejected",
        "checked (dry run)" if dry_run else "imported",
        report.rows,
        report.inserted,
        report.updated,
        report.unchanged,
        report.rejected_rows,
    )
    return report


def _check_and_plan(
    table: CensusTable,
    layout: _Layout,
    registry: _Registry,
    report: CensusReport,
    skip_invalid: bool,
) -> _Plan | None:
    """Checks every row into `report`; the plan of the writes, or None when rejected."""
    checker = _Checker(registry, layout)
    valid: list[_Cover] = []
    intern = _Interner()
    for number, cells in table.rows:
        if all(cell is None or (isinstance(cell, str) and not cell.strip()) for cell in cells):
            continue
        report.rows += 1
        row, errors = _parse_row(number, cells, layout)
        errors += checker.check(row)
        if errors:
            report.errors += errors
            report.rejected_rows += 1
        else:
            valid.append(_compact(row, intern))
    if report.errors and not skip_invalid:
        return None
    plan = _plan(valid, registry, layout.present)
    _count(report, plan)
    report.bindings_ended = len(_ended_bindings(plan, registry))
    return plan


def _count(report: CensusReport, plan: _Plan) -> None:
    report.inserted = len(plan.inserts)
    report.updated = len(plan.updates)
    report.unchanged = plan.unchanged
    report.roads_created = len(plan.new_roads)
    report.devices_created = len(plan.new_devices)
    report.devices_updated = len(plan.device_updates)
    report.bindings_made = len(plan.bindings)


def summary(report: CensusReport) -> str:
    """One sentence saying what the import did (or would do), naming only what happened."""
    if report.errors and not report.committed and not report.dry_run:
        return (
            f"Rejected, nothing written: {report.rejected_rows} of {report.rows} rows"
            " have problems."
        )
    done = [
        f"{count} {what}"
        for count, what in (
            (report.inserted, "covers new"),
            (report.updated, "covers updated"),
            (report.roads_created, "roads new"),
            (report.devices_created, "devices new"),
            (report.devices_updated, "devices updated"),
            (report.bindings_made, "devices bound to covers"),
            (report.bindings_ended, "earlier bindings ended (sensor replaced or moved)"),
            (report.rejected_rows, "rows rejected and skipped"),
        )
        if count
    ]
    if not done or done == [f"{report.rejected_rows} rows rejected and skipped"]:
        nothing = "Dry run: nothing would change" if report.dry_run else "Nothing changed"
        return f"{nothing}: all {report.unchanged} valid rows match the registry." + (
            f" {report.rejected_rows} rows rejected and skipped." if report.rejected_rows else ""
        )
    prefix = "Dry run (nothing written)" if report.dry_run else "Imported"
    unchanged = f"; {report.unchanged} covers unchanged" if report.unchanged else ""
    return f"{prefix} {report.rows} rows: {', '.join(done)}{unchanged}."


__all__ = [
    "CensusFileError",
    "CensusReport",
    "CensusTable",
    "RowError",
    "import_census",
    "read_census",
    "read_census_file",
    "summary",
]
