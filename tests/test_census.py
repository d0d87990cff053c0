"""Census import on SQLite and PostgreSQL: headers, encodings, XLSX, exact reports, upsert."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from openpyxl import Workbook
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.census import (
    CensusFileError,
    CensusReport,
    RowError,
    import_census,
    read_census,
    summary,
)
from core.registry_models import CoverRow, DeviceBindingRow, DeviceRow, RoadRow
from core.registry_schemas import CoverState, CoverUpdate, EndReason, RoadCreate, ThresholdOverrides
from tests.db_fixtures import BACKENDS, add_units, fresh_database_url, migrated_sessions

pytestmark = pytest.mark.asyncio

ENGLISH = (
    "cover_id,kind_code,owner_unit,road,lon,lat,depth_cm,installed_on,flood_prone,state,device_id"
)
CHINESE = "编号,类别代码,权属单位,道路,经度,纬度,井深,安装日期,易涝点,状态,设备编号"
GOOD_ROWS = [
    "4112030101000001,0101,WATER,Zhongzhou Road,112.4539,34.6197,220,2021-05-01,1,in_service,"
    "SC-0001",
    "4112030102000001,0102,DRAIN,Zhongzhou Road,112.4541,34.6199,310,,否,在用,",
    "4112030103000001,0103,DRAIN,Kaiyuan Avenue,112.4601,34.6201,,,true,,SC-0002",
]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "census")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated_sessions(database_url) as made:
        await add_units(made)
        yield made


def csv_bytes(header: str, rows: list[str], *, bom: bool = False) -> bytes:
    text = "\r\n".join([header, *rows]) + "\r\n"
    return ("\ufeff" if bom else "").encode() + text.encode("utf-8")


async def run_import(
    sessions: async_sessionmaker[AsyncSession], data: bytes, **options: Any
) -> CensusReport:
    async with db.transaction(sessions) as session:
        return await import_census(session=session, table=read_census(data), **options)


async def counts(sessions: async_sessionmaker[AsyncSession]) -> dict[str, int]:
    async with db.transaction(sessions, write=False) as session:
        return {
            model.__tablename__: await session.scalar(select(func.count()).select_from(model)) or 0
            for model in (CoverRow, RoadRow, DeviceRow, DeviceBindingRow)
        }


async def version(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with db.transaction(sessions, write=False) as session:
        return await registry.registry_version(session=session)


# -- good files -------------------------------------------------------------------------


async def test_english_headers_import_covers_roads_devices_and_bindings(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    report = await run_import(sessions, csv_bytes(ENGLISH, GOOD_ROWS))

    assert report.errors == []
    assert (report.rows, report.inserted, report.updated, report.unchanged) == (3, 3, 0, 0)
    assert (report.roads_created, report.devices_created, report.bindings_made) == (2, 2, 2)
    assert report.committed
    assert await counts(sessions) == {
        "covers": 3,
        "roads": 2,
        "devices": 2,
        "device_bindings": 2,
    }
    async with db.transaction(sessions, write=False) as session:
        water = await registry.get_cover(session=session, cover_id="4112030101000001")
        storm = await registry.get_cover(session=session, cover_id="4112030103000001")
    assert water.owner_unit == "WATER"
    assert (water.lon, water.lat, water.depth_cm) == (112.4539, 34.6197, 220.0)
    assert water.installed_on == date(2021, 5, 1)
    assert water.flood_prone is True
    assert water.device_id == "SC-0001"
    assert water.state is CoverState.IN_SERVICE
    assert storm.road == "Kaiyuan Avenue"
    assert storm.depth_cm is None
    assert storm.device_id == "SC-0002"


async def test_chinese_headers_with_a_bom_read_the_same(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    report = await run_import(sessions, csv_bytes(CHINESE, GOOD_ROWS, bom=True))

    assert report.errors == []
    assert report.inserted == 3
    async with db.transaction(sessions, write=False) as session:
        sewage = await registry.get_cover(session=session, cover_id="4112030102000001")
    assert sewage.owner_unit == "DRAIN"
    assert sewage.flood_prone is False  # 否


def xlsx_bytes(rows: list[list[Any]]) -> bytes:
    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:
        sheet.append(row)
    buffer = io.BytesIO()
    book.save(buffer)
    return buffer.getvalue()


async def test_xlsx_with_chinese_headers_and_spreadsheet_cell_types(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    data = xlsx_bytes(
        [
            ["编号", "类别代码", "权属单位", "道路", "经度", "纬度", "安装日期", "防坠网"],
            [
                "4112030101000001",
                "0101",
                "WATER",
                "Zhongzhou Road",
                112.4539,
                34.6197,
                date(2020, 1, 2),
                True,
            ],
            # 0102 typed into a number cell arrives as 102; a date cell as a datetime.
            ["4112030102000001", 102, "DRAIN", "Zhongzhou Road", 112.4541, 34.6199, None, 0],
            [None, None, None, None, None, None, None, None],  # a blank row is skipped
            [4112030103000001, "0103", "DRAIN", "Kaiyuan Avenue", 112.46, 34.62, None, None],
        ]
    )
    report = await run_import(sessions, data)

    assert report.rows == 3
    assert report.errors == [
        RowError(
            5,
            "编号",
            "stored as a number, which spreadsheets keep to 15 significant digits: format the"
            " column as text and enter the numbers again",
        )
    ]
    assert await counts(sessions) == {"covers": 0, "roads": 0, "devices": 0, "device_bindings": 0}

    report = await run_import(sessions, data, skip_invalid=True)
    assert (report.inserted, report.rejected_rows) == (2, 1)
    async with db.transaction(sessions, write=False) as session:
        water = await registry.get_cover(session=session, cover_id="4112030101000001")
        sewage = await registry.get_cover(session=session, cover_id="4112030102000001")
    assert (water.installed_on, water.anti_fall) == (date(2020, 1, 2), True)
    assert (sewage.kind_code, sewage.anti_fall) == ("0102", False)


# -- broken files -----------------------------------------------------------------------

BROKEN_ROWS = [
    GOOD_ROWS[0],
    # row 3: bad number, then a bad longitude and a future date in the same row
    "411203010100001,0101,WATER,Zhongzhou Road,212.5,34.6,,2999-01-01,,,",
    # row 4: class in kind_code differs from the number; unknown owner
    "4112030102000002,0103,NOBODY,Zhongzhou Road,112.45,34.61,,,,,",
    # row 5: the same number as row 2
    "4112030101000001,0101,WATER,Zhongzhou Road,112.45,34.61,,,,,",
    # row 6: empty road, a flag that is not one, a state that is not one
    "4112030103000002,0103,DRAIN,,112.45,34.61,,,maybe,broken,",
    # row 7: the device of row 2 again; depth not a number
    "4112030103000003,0103,DRAIN,Kaiyuan Avenue,112.45,34.61,deep,,,,SC-0001",
    # row 8: owner unknown (class 14) on a road without township
    "4112030114000001,0114,,Kaiyuan Avenue,112.45,34.61,,,,,",
    # row 9: a water cover given to the township; and a device id with a slash
    "4112030101000009,0101,TOWN-1,Kaiyuan Avenue,112.45,34.61,,,,,SC/1",
    GOOD_ROWS[1],
]


async def test_broken_rows_are_reported_exactly_and_nothing_is_imported(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    before = await version(sessions)
    report = await run_import(sessions, csv_bytes(ENGLISH, BROKEN_ROWS))

    assert [(error.row, error.column) for error in report.errors] == [
        (3, "cover_id"),
        (3, "lon"),
        (3, "installed_on"),
        (4, "kind_code"),
        (4, "owner_unit"),
        (5, "cover_id"),
        (6, "road"),
        (6, "flood_prone"),
        (6, "state"),
        (7, "depth_cm"),
        (7, "device_id"),
        (8, "owner_unit"),
        (9, "device_id"),
    ]
    reasons = {(error.row, error.column): error.reason for error in report.errors}
    assert reasons[(3, "cover_id")] == "must be 16 digits, got '411203010100001'"
    assert reasons[(3, "lon")] == "Input should be less than or equal to 180"
    assert reasons[(3, "installed_on")] == "2999-01-01 is in the future"
    assert reasons[(4, "kind_code")] == "0103 differs from the class in the cover number (0102)"
    assert reasons[(4, "owner_unit")] == "unit 'NOBODY' does not exist"
    assert reasons[(5, "cover_id")] == "4112030101000001 is also in row 2"
    assert reasons[(6, "road")] == "required, but empty"
    assert reasons[(6, "flood_prone")] == "'maybe' is not 1/0, true/false or 是/否"
    assert reasons[(7, "device_id")] == "SC-0001 is also in row 2"
    assert reasons[(7, "depth_cm")] == "'deep' is not a number"
    assert reasons[(8, "owner_unit")] == (
        "empty, and road 'Kaiyuan Avenue' has no township unit to fall back to"
    )
    assert (report.rows, report.rejected_rows, report.inserted) == (9, 7, 0)
    assert not report.committed
    # Nothing half-imported: not even the good rows, and the registry did not move.
    assert await counts(sessions) == {"covers": 0, "roads": 0, "devices": 0, "device_bindings": 0}
    assert await version(sessions) == before


async def test_water_cover_given_to_a_township_is_fine_but_an_orphan_needs_one(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Row 9 of the broken file is accepted on its own: a township may own a water cover.
    async with db.transaction(sessions) as session:
        await registry.create_road(
            session=session, road=RoadCreate(name="Xigong Lane", township_unit="TOWN-1")
        )
    rows = [
        "4112030101000009,0101,TOWN-1,Kaiyuan Avenue,112.45,34.61,,,,,",
        "4112030114000001,0114,,Xigong Lane,112.45,34.61,,,,,",
        "4112030114000002,0114,WATER,Xigong Lane,112.45,34.61,,,,,",
    ]
    report = await run_import(sessions, csv_bytes(ENGLISH, rows), skip_invalid=True)

    assert report.errors == [
        RowError(
            4,
            "owner_unit",
            "a class-14 cover (owner unknown) belongs to a township unit, not water_supply 'WATER'",
        )
    ]
    async with db.transaction(sessions, write=False) as session:
        orphan = await registry.get_cover(session=session, cover_id="4112030114000001")
    assert orphan.owner_unit == "TOWN-1"


async def test_skip_invalid_imports_the_valid_rows_only(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    report = await run_import(sessions, csv_bytes(ENGLISH, BROKEN_ROWS), skip_invalid=True)

    assert (report.inserted, report.rejected_rows, len(report.errors)) == (2, 7, 13)
    assert report.committed
    assert (await counts(sessions))["covers"] == 2


async def test_dry_run_reports_everything_and_writes_nothing(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    before = await version(sessions)
    report = await run_import(sessions, csv_bytes(ENGLISH, GOOD_ROWS), dry_run=True)

    assert (report.inserted, report.roads_created, report.bindings_made) == (3, 2, 2)
    assert report.dry_run
    assert not report.committed
    assert await counts(sessions) == {"covers": 0, "roads": 0, "devices": 0, "device_bindings": 0}
    assert await version(sessions) == before


@pytest.mark.parametrize(
    ("header", "ignore_unknown", "expected"),
    [
        (
            ENGLISH + ",colour",
            False,
            [RowError(1, "colour", "unknown column (see DESIGN §11)")],
        ),
        (
            "cover_id,kind_code,owner_unit,road,lon,编号",
            False,
            [
                RowError(1, "编号", "same column as 'cover_id'"),
                RowError(1, "lat / 纬度", "required column missing"),
            ],
        ),
        (
            "cover_id,kind_code,owner_unit,road,lon,lat,,remark",
            True,
            [],
        ),
    ],
)
async def test_header_problems_reject_the_whole_file(
    sessions: async_sessionmaker[AsyncSession],
    header: str,
    ignore_unknown: bool,
    expected: list[RowError],
) -> None:
    width = header.count(",") + 1
    row = ",".join((GOOD_ROWS[0].split(",") + [""] * width)[:width])
    if expected:
        with pytest.raises(CensusFileError) as refused:
            await run_import(sessions, csv_bytes(header, [row]), ignore_unknown=ignore_unknown)
        assert refused.value.errors == expected
        return
    report = await run_import(sessions, csv_bytes(header, [row]), ignore_unknown=ignore_unknown)
    assert report.ignored_columns == ["(column 7 has no header)", "remark"]
    assert report.inserted == 1


async def test_a_file_that_is_not_utf8_says_where(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    data = csv_bytes(ENGLISH, GOOD_ROWS[:2]) + "4112030103000001,0103,DRAIN,开元大道".encode("gbk")

    with pytest.raises(CensusFileError) as refused:
        await run_import(sessions, data)
    assert refused.value.errors[0].row == 4
    assert "not UTF-8" in refused.value.errors[0].reason


async def test_an_empty_file_is_refused(sessions: async_sessionmaker[AsyncSession]) -> None:
    with pytest.raises(CensusFileError, match="empty"):
        await run_import(sessions, b"")


# -- upsert -----------------------------------------------------------------------------


async def test_reimport_updates_changed_covers_and_leaves_the_rest(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await run_import(sessions, csv_bytes(ENGLISH, GOOD_ROWS))
    overrides = ThresholdOverrides(tilt_open_deg=30)
    async with db.transaction(sessions) as session:
        await registry.update_cover(
            session=session,
            cover_id="4112030101000001",
            update=CoverUpdate(thresholds=overrides),
        )

    changed = [GOOD_ROWS[0].replace("220,", "250,"), *GOOD_ROWS[1:]]
    report = await run_import(sessions, csv_bytes(ENGLISH, changed))
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 2)
    assert report.bindings_made == 0  # the devices are where the file says already

    # A file without the state column leaves states alone; an empty cell would reset them.
    async with db.transaction(sessions) as session:
        await registry.update_cover(
            session=session,
            cover_id="4112030102000001",
            update=CoverUpdate(state=CoverState.ABANDONED),
        )
    short_header = "cover_id,kind_code,owner_unit,road,lon,lat"
    short = [",".join(row.split(",")[:6]) for row in changed]
    report = await run_import(sessions, csv_bytes(short_header, short))
    assert (report.updated, report.unchanged) == (0, 3)

    async with db.transaction(sessions, write=False) as session:
        water = await registry.get_cover(session=session, cover_id="4112030101000001")
        sewage = await registry.get_cover(session=session, cover_id="4112030102000001")
    assert water.depth_cm == 250
    assert water.thresholds == overrides  # the census does not carry thresholds
    assert sewage.state is CoverState.ABANDONED


async def test_census_moves_and_replaces_devices_with_history(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await run_import(sessions, csv_bytes(ENGLISH, GOOD_ROWS))
    # SC-0002 moves to the sewage cover; SC-0003 replaces SC-0002 on the storm cover.
    rows = [
        GOOD_ROWS[0],
        GOOD_ROWS[1].rstrip(",") + ",SC-0002",
        GOOD_ROWS[2].replace("SC-0002", "SC-0003"),
    ]
    report = await run_import(sessions, csv_bytes(ENGLISH, rows))

    # One binding ends: SC-0002 leaves the storm cover, which SC-0003 takes.
    assert (report.devices_created, report.bindings_made, report.bindings_ended) == (1, 2, 1)
    assert summary(report) == (
        "Imported 3 rows: 1 devices new, 2 devices bound to covers,"
        " 1 earlier bindings ended (sensor replaced or moved); 3 covers unchanged."
    )
    async with db.transaction(sessions, write=False) as session:
        storm = await registry.binding_history(session=session, cover_id="4112030103000001")
        moved = await registry.get_device(session=session, device_id="SC-0002")
    assert [(b.device_id, b.end_reason) for b in storm] == [
        ("SC-0002", EndReason.MOVED),
        ("SC-0003", None),
    ]
    assert moved.cover_id == "4112030102000001"


async def test_five_thousand_covers_import_in_bulk(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    minor = [f"{1 + n % 3:02d}" for n in range(5000)]
    rows = [
        f"41120301{minor[n]}{n + 1:06d},01{minor[n]},{'WATER' if minor[n] == '01' else 'DRAIN'},"
        f"Road {n % 50},112.{n:05d},34.{n:05d},200,2020-01-01,0,in_service,SC-{n:05d}"
        for n in range(5000)
    ]
    started = time.perf_counter()
    report = await run_import(sessions, csv_bytes(ENGLISH, rows))
    first = time.perf_counter() - started

    assert report.errors == []
    assert (report.inserted, report.roads_created, report.bindings_made) == (5000, 50, 5000)
    assert await counts(sessions) == {
        "covers": 5000,
        "roads": 50,
        "devices": 5000,
        "device_bindings": 5000,
    }
    # A re-import of the same file changes nothing; both stay far from the 30 s budget
    # (100,000 covers, see bench/registry.py).
    started = time.perf_counter()
    again = await run_import(sessions, csv_bytes(ENGLISH, rows))
    assert (again.unchanged, again.updated, again.bindings_made) == (5000, 0, 0)
    assert first < 10
    assert time.perf_counter() - started < 10
