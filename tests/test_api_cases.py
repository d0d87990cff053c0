"""The case workflow through the API: moves and actors, refusals, urgent-first lists."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select

from alerting.cases import MINUTE_MS
from alerting.models import CaseEventRow, OutboxRow
from core import db
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import (
    DRAIN_COVER,
    DRAIN_COVER_2,
    HOLDERS,
    T0,
    WATER_COVER,
    RunningApi,
    running_api,
)

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_cases")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


async def move(api: RunningApi, who: str, case_id: int, to: str, note: str = "") -> Any:
    return await api.client(who).post(
        f"/api/v1/cases/{case_id}/transitions", json={"to": to, "note": note}
    )


async def test_crew_and_dispatcher_take_a_case_to_closed(api: RunningApi) -> None:
    case_id = await api.strike("dev-1")
    steps = [
        ("crew", "acknowledged", "on my way"),
        ("crew", "on_site", ""),
        ("crew", "resolved", "cover reseated, lock replaced"),
        ("dispatcher", "verified", "checked on camera"),
        ("dispatcher", "closed", ""),
    ]
    for who, to, note in steps:
        api.clock.advance(MINUTE_MS)
        response = await move(api, who, case_id, to, note)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == to
        assert response.json()["state_times"][to] == api.clock.now
    detail = (await api.client("viewer").get(f"/api/v1/cases/{case_id}")).json()
    moves = [
        (event["actor"], event["to_status"], event["note"])
        for event in detail["timeline"]
        if event["action"] == "transition" and event["actor"] != "system"
    ]
    assert moves == [(HOLDERS[who], to, note) for who, to, note in steps]
    assert detail["allowed_transitions"] == []
    assert [alert["kind"] for alert in detail["alerts"]] == ["cover_displaced"]
    # The outbox carries each move with its actor, for the notifiers and the stream.
    async with db.transaction(api.sessions, write=False) as session:
        events = list(
            await session.scalars(select(OutboxRow).where(OutboxRow.type == "case.changed"))
        )
    actors = [event.payload["actor"] for event in events if event.payload.get("to") != "dispatched"]
    assert actors == [HOLDERS[who] for who, _, _ in steps]


async def test_illegal_moves_are_refused_naming_the_allowed_ones(api: RunningApi) -> None:
    case_id = await api.strike("dev-1")
    assert (await move(api, "crew", case_id, "acknowledged")).status_code == 200
    skipped = await move(api, "crew", case_id, "resolved")
    assert skipped.status_code == 409
    body = skipped.json()
    assert body["code"] == "illegal_transition"
    assert body["details"] == {
        "current": "acknowledged",
        "wanted": "resolved",
        "allowed": ["cancelled", "on_site"],
    }
    assert "allowed: cancelled, on_site" in body["message"]
    # Nothing changed, and the refusal left no trace in the timeline.
    detail = (await api.client("crew").get(f"/api/v1/cases/{case_id}")).json()
    assert detail["status"] == "acknowledged"
    async with db.transaction(api.sessions, write=False) as session:
        wanted = await session.scalars(
            select(CaseEventRow.to_status).where(CaseEventRow.case_id == case_id)
        )
        assert "resolved" not in list(wanted)
    # A crew does not verify, close or cancel: a dispatcher's moves.
    for to in ("verified", "closed", "cancelled", "dispatched"):
        refused = await move(api, "crew", case_id, to, "done")
        assert (refused.status_code, refused.json()["code"]) == (403, "forbidden")
    unknown = await move(api, "dispatcher", 999_999, "acknowledged")
    assert (unknown.status_code, unknown.json()["code"]) == (404, "not_found")
    bad = await api.client("dispatcher").post(
        f"/api/v1/cases/{case_id}/transitions", json={"to": "fixed"}
    )
    assert (bad.status_code, bad.json()["code"]) == (422, "invalid")
    assert bad.json()["details"][0]["loc"] == ["body", "to"]


async def test_cancelling_needs_a_reason(api: RunningApi) -> None:
    case_id = await api.strike("dev-2")
    silent = await move(api, "dispatcher", case_id, "cancelled", "  ")
    assert (silent.status_code, silent.json()["code"]) == (422, "reason_required")
    done = await move(api, "dispatcher", case_id, "cancelled", "lorry hit the sensor housing")
    assert done.status_code == 200
    assert done.json()["cancel_reason"] == "lorry hit the sensor housing"
    again = await move(api, "admin", case_id, "dispatched")
    assert again.status_code == 409
    assert again.json()["details"]["allowed"] == []


async def test_cases_are_listed_urgent_first_and_filtered(api: RunningApi) -> None:
    water = await api.strike("dev-1")  # critical, T0: acknowledge by T0+10m
    api.clock.advance(5 * MINUTE_MS)
    drain = await api.strike("dev-2")  # critical, T0+5m: acknowledge by T0+15m
    for minute in range(3):  # three low-battery readings: a minor case
        api.reading("dev-3", api.clock.now + minute, battery=3.1)
    await api.engine.commit_pending()
    [minor] = [c["id"] for c in await all_cases(api) if c["cover_id"] == DRAIN_COVER_2]
    assert (await move(api, "crew", water, "acknowledged")).status_code == 200
    assert (await move(api, "crew", water, "on_site")).status_code == 200  # next: resolved, T0+6h
    order = [case["id"] for case in await all_cases(api)]
    assert order == [drain, water, minor]
    cases = {case["id"]: case for case in await all_cases(api)}
    assert cases[drain]["next_deadline_ms"] == T0 + 15 * MINUTE_MS
    assert cases[water]["next_deadline_ms"] == T0 + 360 * MINUTE_MS
    assert cases[minor]["severity"] == "minor"
    # A finished case goes last, whatever its severity.
    assert (await move(api, "dispatcher", drain, "cancelled", "false alarm")).status_code == 200
    assert [case["id"] for case in await all_cases(api)] == [water, minor, drain]

    async def ids(**params: Any) -> list[int]:
        answer = await api.client("viewer").get("/api/v1/cases", params=params)
        assert answer.status_code == 200, answer.text
        return [case["id"] for case in answer.json()["items"]]

    assert await ids(status="on_site") == [water]
    assert await ids(unit="DRAIN") == [minor, drain]
    assert await ids(cover_id=WATER_COVER) == [water]
    assert await ids(overdue=True) == []
    api.clock.advance(7 * 60 * MINUTE_MS)  # past 6 h; the minor case has 72 h
    await api.engine.run_timers()
    await api.engine.commit_pending()
    assert await ids(overdue=True) == [water]  # on site, not resolved within 6 h
    # Seven quiet hours: dev-2's cover, whose case was cancelled, opens a "silent" one.
    [silent] = [c["id"] for c in await all_cases(api) if c["kinds"] == ["device_silent"]]
    assert await ids(overdue=False) == [minor, silent, drain]
    page = (await api.client("viewer").get("/api/v1/cases", params={"limit": 2})).json()
    assert (len(page["items"]), page["next_offset"]) == (2, 2)
    last = (await api.client("viewer").get("/api/v1/cases", params={"offset": 2})).json()
    assert ([c["id"] for c in last["items"]], last["next_offset"]) == ([silent, drain], None)


async def all_cases(api: RunningApi) -> list[dict[str, Any]]:
    answer = await api.client("viewer").get("/api/v1/cases", params={"limit": 500})
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


async def test_alerts_are_filtered_and_a_case_shows_its_incident(api: RunningApi) -> None:
    flooded = await api.strike("dev-2", water=180.0)  # two covers flooding on one road
    api.clock.advance(MINUTE_MS)
    await api.strike("dev-3", water=185.0)
    await api.strike("dev-1")
    detail = (await api.client("viewer").get(f"/api/v1/cases/{flooded}")).json()
    assert detail["incident"]["kind"] == "flooding"
    assert detail["incident"]["road"] == "Renmin Road"
    assert [alert["kind"] for alert in detail["alerts"]] == ["water_high"]

    async def kinds(**params: Any) -> list[tuple[str, str]]:
        answer = await api.client("viewer").get("/api/v1/alerts", params=params)
        assert answer.status_code == 200, answer.text
        return [(a["cover_id"], a["kind"]) for a in answer.json()["items"]]

    assert await kinds() == [  # newest first
        (WATER_COVER, "cover_displaced"),
        (DRAIN_COVER_2, "water_high"),
        (DRAIN_COVER, "water_high"),
    ]
    assert await kinds(kind="water_high", cover_id=DRAIN_COVER) == [(DRAIN_COVER, "water_high")]
    assert await kinds(active=False) == []
    for offset in range(1, 4):  # the water falls back: cleared after three normal readings
        api.reading("dev-2", api.clock.now + offset * 1000)
    await api.engine.commit_pending()
    assert await kinds(active=False) == [(DRAIN_COVER, "water_high")]
    assert len(await kinds(active=True)) == 2
    unknown = await api.client("viewer").get("/api/v1/alerts", params={"kind": "fire"})
    assert unknown.status_code == 422
