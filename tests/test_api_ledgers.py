"""The ledgers' rows equal the database's, in CSV and XLSX, with Chinese and English headings."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from openpyxl import load_workbook
from sqlalchemy import select

from alerting.cases import MINUTE_MS
from alerting.models import CaseRow
from core import db, registry
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import HOLDERS, T0, RunningApi, running_api

pytestmark = pytest.mark.asyncio

SHANGHAI = ZoneInfo("Asia/Shanghai")
HOUR_MS = 60 * MINUTE_MS
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_ledgers")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        await make_history(running)
        yield running


async def make_history(api: RunningApi) -> None:
    """T0 is 16:00 on 15 January in Shanghai. WATER's case is closed that day, DRAIN's
    first one verified; its second opens after midnight and is cancelled."""

    async def move(who: str, case_id: int, to: str, note: str = "") -> None:
        api.clock.advance(10 * MINUTE_MS)
        answer = await api.client(who).post(
            f"/api/v1/cases/{case_id}/transitions", json={"to": to, "note": note}
        )
        assert answer.status_code == 200, answer.text

    water = await api.strike("dev-1")
    drain = await api.strike("dev-2", water=180.0)
    for to in ("acknowledged", "on_site", "resolved"):
        await move("crew", water, to)
        await move("crew_drain", drain, to)
    await move("dispatcher", water, "verified", "re-inspected")
    await move("admin", water, "closed")
    await move("dispatcher", drain, "verified")
    api.clock.now = T0 + 9 * HOUR_MS  # 01:00 on the 16th in Shanghai
    late = await api.strike("dev-3")
    await move("dispatcher", late, "cancelled", '=HYPERLINK("http://x") sensor knocked')


async def cases_in_db(api: RunningApi) -> list[CaseRow]:
    async with db.transaction(api.sessions, write=False) as session:
        return list(await session.scalars(select(CaseRow).order_by(CaseRow.opened_ms, CaseRow.id)))


def when(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000, SHANGHAI).isoformat(timespec="seconds")


def csv_rows(body: bytes) -> list[list[str]]:
    assert body.startswith(b"\xef\xbb\xbf")  # the BOM Excel needs for Chinese text
    return list(csv.reader(io.StringIO(body.decode("utf-8-sig"))))


async def fetch(api: RunningApi, ledger: str, who: str = "viewer", **params: Any) -> Any:
    answer = await api.client(who).get(f"/api/v1/ledgers/{ledger}", params=params)
    assert answer.status_code == 200, answer.text
    return answer


def expected_problems(cases: list[CaseRow]) -> list[list[str]]:
    names = {"WATER": "Water supply company", "DRAIN": "Drainage company"}
    rows = []
    for case in cases:
        times = case.state_times
        rows.append(
            [
                str(case.id),
                case.cover_id,
                case.road or "",
                case.unit_code,
                names[case.unit_code],
                "; ".join(case.kinds),
                case.severity,
                case.status,
                when(case.opened_ms),
                *(
                    when(times.get(s))
                    for s in ("dispatched", "acknowledged", "on_site", "resolved", "verified")
                ),
                when(times.get("closed")),
                when(case.deadlines.get("resolved")),
                "true" if case.overdue else "false",
                str(case.reopened),
                "'" + case.cancel_reason if case.cancel_reason else "",
            ]
        )
    return rows


async def test_problems_ledger_rows_equal_the_cases(api: RunningApi) -> None:
    cases = await cases_in_db(api)
    assert [c.status for c in cases] == ["closed", "verified", "cancelled"]
    rows = csv_rows((await fetch(api, "problems", lang="en")).content)
    assert rows[0][:3] == ["case_id", "cover_id", "road"]
    assert rows[1:] == expected_problems(cases)
    # The cancel reason starts with "=": written so that no spreadsheet runs it.
    assert rows[3][-1].startswith("'=HYPERLINK")
    zh = csv_rows((await fetch(api, "problems")).content)
    assert zh[0][:4] == ["案件编号", "井盖编号", "道路", "权属单位代码"]
    assert [row[7] for row in zh[1:]] == ["结案", "核查通过", "作废"]
    assert [row[6] for row in zh[1:]] == ["紧急", "重要", "紧急"]
    assert zh[2][5] == "水位过高"
    # By period: the day in Shanghai, not in UTC.
    first_day = csv_rows(
        (await fetch(api, "problems", **{"from": "2027-01-15", "to": "2027-01-15"})).content
    )
    assert [row[0] for row in first_day[1:]] == [str(cases[0].id), str(cases[1].id)]
    second_day = csv_rows((await fetch(api, "problems", **{"from": "2027-01-16"})).content)
    assert [row[0] for row in second_day[1:]] == [str(cases[2].id)]
    utc = csv_rows((await fetch(api, "problems", tz="UTC", **{"from": "2027-01-16"})).content)
    assert utc[1:] == []  # 01:00 in Shanghai is still the 15th in UTC
    drain = csv_rows((await fetch(api, "problems", unit="DRAIN")).content)
    assert [row[3] for row in drain[1:]] == ["DRAIN", "DRAIN"]
    crew = csv_rows((await fetch(api, "problems", who="crew")).content)
    assert [row[3] for row in crew[1:]] == ["WATER"]


async def test_problems_ledger_as_xlsx(api: RunningApi) -> None:
    cases = await cases_in_db(api)
    answer = await fetch(api, "problems", format="xlsx", lang="en")
    assert answer.headers["content-type"] == XLSX
    assert "problems.xlsx" in answer.headers["content-disposition"]
    sheet = load_workbook(io.BytesIO(answer.content)).active
    assert sheet is not None
    assert sheet.title == "problems"
    values = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert values[0][:2] == ["case_id", "cover_id"]
    expected = expected_problems(cases)
    for got, want, case in zip(values[1:], expected, cases, strict=True):
        assert got[0] == case.id
        assert got[8] == datetime.fromtimestamp(case.opened_ms / 1000, SHANGHAI).replace(
            tzinfo=None
        )
        assert [str(v) if v is not None else "" for v in got[1:8]] == want[1:8]
    # A text cell, never a formula, even when it starts with "=".
    assert str(values[3][-1]).startswith("=HYPERLINK")
    assert sheet.cell(row=4, column=19).data_type == "s"


async def test_acceptance_ledger_lists_verified_and_closed(api: RunningApi) -> None:
    closed, verified, _ = await cases_in_db(api)
    rows = csv_rows((await fetch(api, "acceptance", lang="en")).content)
    assert rows[0] == [
        "case_id",
        "cover_id",
        "road",
        "unit_code",
        "unit_name",
        "problem",
        "status",
        "opened_at",
        "resolved_at",
        "verified_at",
        "verified_by",
        "closed_at",
        "closed_by",
        "resolve_hours",
    ]
    got = {row[0]: row for row in rows[1:]}
    assert list(got) == [str(closed.id), str(verified.id)]  # in order of verification
    water = got[str(closed.id)]
    assert water[6] == "closed"
    assert water[9] == when(closed.state_times["verified"])
    assert (water[10], water[12]) == (HOLDERS["dispatcher"], HOLDERS["admin"])
    hours = (closed.state_times["resolved"] - closed.opened_ms) / 3_600_000
    assert water[13] == repr(round(hours, 2))
    drain = got[str(verified.id)]
    assert (drain[6], drain[10], drain[11], drain[12]) == (
        "verified",
        HOLDERS["dispatcher"],
        "",
        "",
    )
    zh = csv_rows((await fetch(api, "acceptance", format="csv")).content)
    assert zh[0][9:11] == ["验收时间", "验收人"]
    later = csv_rows((await fetch(api, "acceptance", **{"from": "2027-01-16"})).content)
    assert later[1:] == []


async def test_census_ledger_is_the_registry_and_imports_back(api: RunningApi) -> None:
    async with db.transaction(api.sessions, write=False) as session:
        covers = await registry.list_covers(session=session)
        devices = {d.device_id: d for d in await registry.list_devices(session=session)}
    for lang in ("en", "zh"):
        body = (await fetch(api, "census", lang=lang)).content
        rows = csv_rows(body)
        assert len(rows) == 1 + len(covers)
        for row, cover in zip(rows[1:], covers, strict=True):
            assert row[:3] == [cover.cover_id, cover.kind_code, cover.owner_unit]
            assert row[4] == cover.road
            assert (float(row[6]), float(row[7])) == (cover.lon, cover.lat)
            assert row[11] == ("false" if lang == "en" else "否")
            assert row[13] == ("in_service" if lang == "en" else "在用")
            assert cover.device_id is not None
            device = devices[cover.device_id]
            assert row[14:] == [
                cover.device_id,
                str(device.report_interval_s),
                device.model or "",
                device.source or "",
                device.external_id or "",
            ]
        again = await api.client("admin").post(
            "/api/v1/covers/import",
            params={"dry_run": True},
            content=body,
            headers={"Content-Type": "text/csv"},
        )
        assert again.status_code == 200, again.text
        assert (again.json()["unchanged"], again.json()["errors"]) == (len(covers), [])


async def test_census_ledger_as_xlsx_has_units_and_devices(api: RunningApi) -> None:
    answer = await fetch(api, "census", format="xlsx")
    book = load_workbook(io.BytesIO(answer.content))
    assert book.sheetnames == ["井盖", "单位", "设备"]
    covers = [list(r) for r in book["井盖"].iter_rows(values_only=True)]
    assert covers[0][:3] == ["编号", "类别代码", "权属单位"]
    assert [row[0] for row in covers[1:]] == [
        "4112030101000001",
        "4112030103000002",
        "4112030103000003",
    ]
    units = [list(r) for r in book["单位"].iter_rows(values_only=True)]
    assert [row[:3] for row in units[1:]] == [
        ["DRAIN", "Drainage company", "drainage"],
        ["TOWN-1", "Xigong township", "township"],
        ["WATER", "Water supply company", "water_supply"],
    ]
    devices = [list(r) for r in book["设备"].iter_rows(values_only=True)]
    assert [(row[0], row[3]) for row in devices[1:]] == [
        ("dev-1", "4112030101000001"),
        ("dev-2", "4112030103000002"),
        ("dev-3", "4112030103000003"),
    ]
    water = load_workbook(
        io.BytesIO((await fetch(api, "census", format="xlsx", unit="WATER")).content)
    )
    assert [r[0] for r in water["设备"].iter_rows(min_row=2, values_only=True)] == ["dev-1"]
    period = await api.client("viewer").get("/api/v1/ledgers/census", params={"from": "2027-01-01"})
    assert (period.status_code, period.json()["code"]) == (400, "bad_request")
    zone = await api.client("viewer").get("/api/v1/ledgers/problems", params={"tz": "Mars/Base"})
    assert (zone.status_code, zone.json()["code"]) == (400, "bad_tz")
