"""NUL and other control characters: the same 422 on SQLite and PostgreSQL, nothing stored.

PostgreSQL cannot store U+0000 while SQLite can, so the rule is checked before either
sees the text: in body strings (core.text), path and query parameters, census cells.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from core.text import FREE_TEXT_PATTERN, PLAIN_PATTERN, control_character_problem
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import WATER_COVER, RunningApi, running_api

NEW_COVER = "4112030102000010"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "control_chars")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


def refused(answer: httpx.Response, code: str = "invalid") -> str:
    """The message of a 422 that names a control character; anything else fails."""
    assert (answer.status_code, answer.json()["code"]) == (422, code), answer.text
    message: str = answer.json()["message"]
    assert "control character U+" in message, message
    return message


def cover(**fields: object) -> dict[str, object]:
    return {
        "cover_id": NEW_COVER,
        "owner_unit": "DRAIN",
        "road": "Jiefang Road",
        "lon": 112.41,
        "lat": 34.61,
        **fields,
    }


@pytest.mark.asyncio
async def test_body_strings_with_control_characters_are_refused_and_not_stored(
    api: RunningApi,
) -> None:
    admin = api.client("admin")
    nul_name = await admin.post(
        "/api/v1/units", json={"code": "X1", "name": "a\x00b", "kind": "gas"}
    )
    assert refused(nul_name) == (
        "body.name: control character U+0000 at position 1: NUL and other control"
        " characters are not allowed"
    )
    secret = await admin.post(
        "/api/v1/units",
        json={"code": "X2", "name": "Gas", "kind": "gas", "webhook_secret": "s3cret\x00s3cret"},
    )
    assert "s3cret" not in refused(secret)  # the secret is not repeated back
    escape = await admin.post("/api/v1/covers", json=cover(road="Jiefang\x1b[2J Road"))
    refused(escape)
    c1 = await admin.patch(f"/api/v1/covers/{WATER_COVER}", json={"material": "cast\x85iron"})
    refused(c1)
    contact = await admin.patch("/api/v1/units/WATER", json={"supervisor_contact": "Wang\x07"})
    refused(contact)
    # Nothing of it was stored.
    for path in ("/api/v1/units/X1", "/api/v1/units/X2", f"/api/v1/covers/{NEW_COVER}"):
        assert (await admin.get(path)).status_code == 404, path
    water = (await admin.get(f"/api/v1/covers/{WATER_COVER}")).json()
    assert water["material"] is None
    unit = (await admin.get("/api/v1/units/WATER")).json()
    assert unit["supervisor_contact"] is None


@pytest.mark.asyncio
async def test_a_note_keeps_its_line_breaks_but_no_other_control_character(
    api: RunningApi,
) -> None:
    case_id = await api.strike("dev-1")
    crew = api.client("crew")
    path = f"/api/v1/cases/{case_id}/transitions"
    nul = await crew.post(path, json={"to": "acknowledged", "note": "on my way\x00"})
    assert "(tab and line breaks are)" in refused(nul)
    case = (await crew.get(f"/api/v1/cases/{case_id}")).json()
    assert case["status"] != "acknowledged"
    note = "on my way\r\n\tETA 10 min"
    moved = await crew.post(path, json={"to": "acknowledged", "note": note})
    assert moved.status_code == 200, moved.text
    timeline = (await crew.get(f"/api/v1/cases/{case_id}")).json()["timeline"]
    assert timeline[-1]["note"] == note


@pytest.mark.asyncio
async def test_path_and_query_parameters_with_control_characters_are_refused(
    api: RunningApi,
) -> None:
    viewer = api.client("viewer")
    answers = {
        "path": await viewer.get("/api/v1/units/WATER%00"),
        "path, free": await viewer.get(f"/api/v1/covers/{WATER_COVER}%1b/readings"),
        "query": await viewer.get("/api/v1/covers", params={"road": "Jiefang\x00Road"}),
        "query, tz": await viewer.get("/api/v1/stats/units", params={"tz": "Asia/Shanghai\x7f"}),
        "query name": await viewer.get("/api/v1/cases", params={"unit\x00": "WATER"}),
    }
    messages = {what: refused(answer, "control_character") for what, answer in answers.items()}
    assert messages["path"].startswith("path parameter 'code': control character U+0000")
    assert messages["query"].startswith("query parameter 'road': control character U+0000")
    assert answers["query name"].json()["details"] == {"in": "query", "name": "unit\x00"}


@pytest.mark.asyncio
async def test_census_cells_with_control_characters_reject_their_row(api: RunningApi) -> None:
    admin = api.client("admin")
    census = (
        "编号,类别代码,权属单位,道路,经度,纬度,材质\n"
        f"{NEW_COVER},0102,DRAIN,Jiefang\x00Road,112.41,34.61,cast iron\n"
        "4112030102000011,0102,DRAIN,Jiefang Road,112.42,34.62,cast\x1biron\n"
    )
    answer = await admin.post(
        "/api/v1/covers/import", content=census.encode(), headers={"Content-Type": "text/csv"}
    )
    assert (answer.status_code, answer.json()["code"]) == (422, "census_rejected"), answer.text
    errors = {(e["row"], e["column"]): e["reason"] for e in answer.json()["details"]["errors"]}
    assert set(errors) == {(2, "道路"), (3, "材质")}
    assert errors[(2, "道路")].startswith("control character U+0000 at position 7")
    listed = await admin.get("/api/v1/covers", params={"road": "Jiefang Road"})
    assert listed.json()["items"] == []


def test_the_rule_and_its_schema_patterns_agree() -> None:
    samples = ["plain", "中文 名称", "tab\there", "line\nbreak", "nul\x00", "del\x7f", "c1\x9f"]
    for text in samples:
        plain_ok = control_character_problem(text) is None
        free_ok = control_character_problem(text, layout_allowed=True) is None
        assert plain_ok == bool(re.match(PLAIN_PATTERN, text)), text
        assert free_ok == bool(re.match(FREE_TEXT_PATTERN, text)), text
