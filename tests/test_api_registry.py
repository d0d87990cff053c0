"""Units, covers and devices through the API, the census import, and the error bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import DRAIN_COVER, DRAIN_COVER_2, WATER_COVER, RunningApi, running_api

pytestmark = pytest.mark.asyncio

ERROR_KEYS = {"status", "code", "message", "details"}


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_registry")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


async def test_units_create_read_update_and_secret_never_shown(api: RunningApi) -> None:
    admin = api.client("admin")
    unit = {
        "code": "GAS-1",
        "name": "City gas",
        "kind": "gas",
        "webhook_url": "https://gas.example/hook",
        "webhook_secret": "s3cret-s3cret",
    }
    made = await admin.post("/api/v1/units", json=unit)
    assert made.status_code == 201, made.text
    assert made.json()["has_webhook_secret"] is True
    assert "webhook_secret" not in made.json()
    again = await admin.post("/api/v1/units", json=unit)
    assert (again.status_code, again.json()["code"]) == (409, "conflict")
    changed = await admin.patch("/api/v1/units/GAS-1", json={"supervisor_contact": "Wang, 138…"})
    assert changed.json()["supervisor_contact"] == "Wang, 138…"
    got = await api.client("viewer").get("/api/v1/units/GAS-1")
    assert got.json()["name"] == "City gas"
    assert "s3cret" not in got.text
    gas = await api.client("viewer").get("/api/v1/units", params={"kind": "gas"})
    assert [u["code"] for u in gas.json()["items"]] == ["GAS-1"]
    cycle = await admin.patch("/api/v1/units/WATER", json={"parent": "WATER"})
    assert (cycle.status_code, cycle.json()["details"]["field"]) == (422, "parent")
    missing = await admin.get("/api/v1/units/NOPE")
    assert missing.status_code == 404
    assert set(missing.json()) == ERROR_KEYS


async def test_a_webhook_url_is_shown_in_full_to_admins_only(api: RunningApi) -> None:
    # Chat robots carry their access token in the URL: it is a secret like the secret.
    robot = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6-7xxx"
    made = await api.client("admin").patch("/api/v1/units/WATER", json={"webhook_url": robot})
    assert made.json()["webhook_url"] == robot
    for who in ("viewer", "crew", "dispatcher"):
        one = await api.client(who).get("/api/v1/units/WATER")
        listed = await api.client(who).get("/api/v1/units")
        assert one.json()["webhook_url"] == "https://qyapi.weixin.qq.com/***", who
        assert "693a91f6" not in one.text + listed.text, who
    full = await api.client("admin").get("/api/v1/units/WATER")
    assert full.json()["webhook_url"] == robot


async def test_covers_list_pages_and_filters(api: RunningApi) -> None:
    viewer = api.client("viewer")
    first = (await viewer.get("/api/v1/covers", params={"limit": 2})).json()
    assert [c["cover_id"] for c in first["items"]] == [WATER_COVER, DRAIN_COVER]
    assert first["next_offset"] == 2
    rest = (await viewer.get("/api/v1/covers", params={"limit": 2, "offset": 2})).json()
    assert ([c["cover_id"] for c in rest["items"]], rest["next_offset"]) == ([DRAIN_COVER_2], None)
    drain = (await viewer.get("/api/v1/covers", params={"owner_unit": "DRAIN"})).json()
    assert [c["cover_id"] for c in drain["items"]] == [DRAIN_COVER, DRAIN_COVER_2]
    cover = (await viewer.get(f"/api/v1/covers/{WATER_COVER}")).json()
    assert (cover["owner_unit"], cover["device_id"], cover["road"]) == (
        "WATER",
        "dev-1",
        "Renmin Road",
    )
    bad = await viewer.get("/api/v1/covers/12345")
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid")
    absent = await viewer.get("/api/v1/covers/4112030101999999")
    assert (absent.status_code, absent.json()["code"]) == (404, "not_found")
    too_many = await viewer.get("/api/v1/covers", params={"limit": 501})
    assert too_many.status_code == 422


async def test_dispatchers_correct_facts_admins_change_ownership(api: RunningApi) -> None:
    dispatcher = api.client("dispatcher")
    fixed = await dispatcher.patch(
        f"/api/v1/covers/{WATER_COVER}", json={"anti_fall": True, "material": "composite"}
    )
    assert fixed.status_code == 200
    assert (fixed.json()["anti_fall"], fixed.json()["material"]) == (True, "composite")
    for change in ({"owner_unit": "DRAIN"}, {"thresholds": {"tilt_open_deg": 30}}):
        refused = await dispatcher.patch(f"/api/v1/covers/{WATER_COVER}", json=change)
        assert refused.status_code == 403, change
    moved = await api.client("admin").patch(
        f"/api/v1/covers/{WATER_COVER}", json={"owner_unit": "DRAIN"}
    )
    assert moved.json()["owner_unit"] == "DRAIN"
    wrong = await api.client("admin").patch(
        f"/api/v1/covers/{WATER_COVER}", json={"owner_unit": "NOBODY"}
    )
    assert (wrong.status_code, wrong.json()["details"]["field"]) == (422, "owner_unit")


async def test_devices_create_list_update(api: RunningApi) -> None:
    admin = api.client("admin")
    made = await admin.post("/api/v1/devices", json={"device_id": "nb-77", "model": "NB-IoT v2"})
    assert made.status_code == 201
    assert made.json()["has_credentials"] is False
    unbound = (await admin.get("/api/v1/devices", params={"bound": False})).json()
    assert [d["device_id"] for d in unbound["items"]] == ["nb-77"]
    bound = (await admin.get("/api/v1/devices", params={"bound": True})).json()
    assert [d["cover_id"] for d in bound["items"]] == [WATER_COVER, DRAIN_COVER, DRAIN_COVER_2]
    slower = await admin.patch("/api/v1/devices/nb-77", json={"report_interval_s": 600})
    assert slower.json()["report_interval_s"] == 600
    too_fast = await admin.patch("/api/v1/devices/nb-77", json={"report_interval_s": 1})
    assert too_fast.status_code == 422
    assert too_fast.json()["details"][0]["loc"] == ["body", "report_interval_s"]


CENSUS = (
    "编号,类别代码,权属单位,道路,经度,纬度,设备编号\n"
    "4112030102000010,0102,DRAIN,Jiefang Road,112.41,34.61,nb-10\n"
    "4112030102000011,0102,DRAIN,Jiefang Road,112.42,34.62,\n"
)


async def test_census_import_reports_rejected_rows(api: RunningApi) -> None:
    admin = api.client("admin")
    csv_headers = {"Content-Type": "text/csv"}
    bad = CENSUS + "4112030102000012,0105,NOBODY,Jiefang Road,200,34.6,\n"
    rejected = await admin.post("/api/v1/covers/import", content=bad.encode(), headers=csv_headers)
    assert rejected.status_code == 422
    body = rejected.json()
    assert body["code"] == "census_rejected"
    report = body["details"]
    assert (report["rows"], report["rejected_rows"], report["committed"]) == (3, 1, False)
    assert {(e["row"], e["column"]) for e in report["errors"]} == {
        (4, "类别代码"),
        (4, "权属单位"),
        (4, "经度"),
    }
    listed = await admin.get("/api/v1/covers", params={"road": "Jiefang Road"})
    assert listed.json()["items"] == []  # all or nothing
    partial = await admin.post(
        "/api/v1/covers/import",
        params={"skip_invalid": True},
        content=bad.encode(),
        headers=csv_headers,
    )
    assert partial.status_code == 200
    assert (partial.json()["inserted"], partial.json()["rejected_rows"]) == (2, 1)
    cover = (await admin.get("/api/v1/covers/4112030102000010")).json()
    assert cover["device_id"] == "nb-10"
    dry = await admin.post(
        "/api/v1/covers/import",
        params={"dry_run": True},
        content=CENSUS.encode(),
        headers=csv_headers,
    )
    assert (dry.json()["unchanged"], dry.json()["committed"]) == (2, False)
    unknown = await admin.post(
        "/api/v1/covers/import", content=b"colour\nred\n", headers=csv_headers
    )
    assert (unknown.status_code, unknown.json()["code"]) == (422, "census_file")
    assert unknown.json()["details"]


async def test_error_bodies_share_one_shape(api: RunningApi) -> None:
    viewer = api.client("viewer")
    answers = [
        await viewer.get("/api/v1/nowhere"),
        await viewer.delete("/api/v1/units"),
        await viewer.get("/api/v1/cases/0"),
        await viewer.get("/api/v1/cases/77"),
        await viewer.get("/api/v1/stats/units", params={"month": "2027-13"}),
        await viewer.post("/api/v1/units", json={}),
        await api.client().get("/api/v1/units"),
    ]
    assert [a.status_code for a in answers] == [404, 405, 422, 404, 400, 403, 401]
    for answer in answers:
        assert set(answer.json()) == ERROR_KEYS
        assert answer.json()["status"] == answer.status_code
        assert answer.json()["message"]


async def test_nul_characters_are_an_error_of_the_request(api: RunningApi) -> None:
    # PostgreSQL cannot store U+0000, SQLite can: refused before either (core.text), the
    # same on both. More in tests/test_control_chars.py.
    admin = api.client("admin")
    case_id = await api.strike("dev-1")
    answers = [
        await admin.get("/api/v1/covers", params={"road": "a\x00b"}),
        await admin.post("/api/v1/units", json={"code": "X1", "name": "a\x00b", "kind": "gas"}),
        await admin.patch(f"/api/v1/covers/{WATER_COVER}", json={"material": "a\x00b"}),
        await admin.post(
            f"/api/v1/cases/{case_id}/transitions", json={"to": "acknowledged", "note": "\x00"}
        ),
    ]
    assert [answer.status_code for answer in answers] == [422] * 4
    assert all("control character U+0000" in answer.json()["message"] for answer in answers)


async def test_every_answer_tells_browsers_not_to_guess_its_type(api: RunningApi) -> None:
    answers = [
        await api.client("viewer").get("/api/v1/units"),
        await api.client(None).get("/api/v1/units"),  # refused: 401
        await api.client("viewer").get("/api/v1/ledgers/census", params={"format": "csv"}),
        await api.client(None).get("/metrics"),
    ]
    assert [a.status_code for a in answers] == [200, 401, 200, 200]
    assert {a.headers.get("x-content-type-options") for a in answers} == {"nosniff"}
