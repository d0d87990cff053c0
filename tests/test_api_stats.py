"""Monthly progress per unit against figures computed by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from alerting.models import CaseEventRow, CaseRow
from core import db, registry
from core.registry_models import CoverRow
from core.registry_schemas import CoverCreate, Unit, UnitKind
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import DRAIN_COVER, DRAIN_COVER_2, WATER_COVER, RunningApi, running_api

pytestmark = pytest.mark.asyncio

SHANGHAI = ZoneInfo("Asia/Shanghai")
W = [WATER_COVER, *(f"411203010100000{n}" for n in range(2, 6))]  # WATER owns five covers
G = ["4112030111000001", "4112030111000002"]  # GAS owns two


def ms(local: str) -> int:
    """`2027-01-05 08:00` in Shanghai, as epoch ms."""
    return int(datetime.fromisoformat(local).replace(tzinfo=SHANGHAI).timestamp() * 1000)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_stats")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        await make_history(running)
        yield running


async def make_history(api: RunningApi) -> None:
    async with db.transaction(api.sessions) as session:
        await registry.create_unit(
            session=session, unit=Unit(code="GAS", name="City gas", kind=UnitKind.GAS)
        )
        for number, owner in [*((n, "WATER") for n in W[1:]), *((n, "GAS") for n in G)]:
            cover = CoverCreate(
                cover_id=number, owner_unit=owner, road="Kaiyuan Road", lon=112.4, lat=34.6
            )
            await registry.create_cover(session=session, cover=cover)
        # Registered on 1 December 2026, whenever the test runs.
        await session.execute(
            update(CoverRow).values(created_at=datetime(2026, 12, 1, tzinfo=SHANGHAI))
        )
        for past in HISTORY:
            await add_case(session, past)


@dataclass(frozen=True)
class Past:
    """A case of the past: its unit, cover, status now, opening, states reached, escalations."""

    unit: str
    cover: str
    status: str
    opened: str
    times: dict[str, str] = field(default_factory=dict)
    escalated: tuple[str, ...] = ()


HISTORY = [
    # WATER: W1 fixed in December, then a new open case in January: a problem again.
    Past("WATER", W[0], "closed", "2026-12-20 10:00",
         {"acknowledged": "2026-12-20 10:05", "resolved": "2026-12-20 12:00",
          "verified": "2026-12-21 09:00", "closed": "2026-12-21 10:00"}),
    Past("WATER", W[1], "verified", "2027-01-05 08:00",
         {"acknowledged": "2027-01-05 08:04", "resolved": "2027-01-05 10:00",
          "verified": "2027-01-06 09:00"}),
    Past("WATER", W[2], "on_site", "2027-01-10 09:00",
         {"acknowledged": "2027-01-10 09:10", "on_site": "2027-01-10 12:00"},
         escalated=("2027-01-10 09:30",)),
    Past("WATER", W[3], "cancelled", "2027-01-20 00:00"),
    Past("WATER", W[0], "dispatched", "2027-01-25 08:00"),
    # DRAIN: D1 fixed in January; D2 resolved only in February (Shanghai time).
    Past("DRAIN", DRAIN_COVER, "closed", "2027-01-02 12:00",
         {"acknowledged": "2027-01-02 12:20", "resolved": "2027-01-02 17:00",
          "verified": "2027-01-03 09:00", "closed": "2027-01-04 09:00"}),
    Past("DRAIN", DRAIN_COVER_2, "verified", "2027-01-30 12:00",
         {"acknowledged": "2027-01-30 12:06", "resolved": "2027-02-01 01:00",
          "verified": "2027-02-02 09:00"},
         escalated=("2027-01-31 18:00",)),
    Past("DRAIN", DRAIN_COVER, "dispatched", "2027-02-03 08:00"),
    # GAS: the same share and overdue count as DRAIN.
    Past("GAS", G[0], "verified", "2027-01-08 10:00",
         {"acknowledged": "2027-01-08 10:30", "resolved": "2027-01-08 11:00",
          "verified": "2027-01-09 09:00"}),
    Past("GAS", G[1], "dispatched", "2027-01-15 10:00", escalated=("2027-01-15 10:11",)),
]  # fmt: skip


async def add_case(session: AsyncSession, past: Past) -> None:
    opened_ms = ms(past.opened)
    case = CaseRow(
        cover_id=past.cover,
        unit_code=past.unit,
        road="Kaiyuan Road",
        severity="critical",
        status=past.status,
        kinds=["cover_displaced"],
        opened_ms=opened_ms,
        state_times={"open": opened_ms, **{state: ms(at) for state, at in past.times.items()}},
        deadlines={"acknowledged": opened_ms + 600_000},
        escalated=["acknowledged"] if past.escalated else [],
        overdue=bool(past.escalated),
        last_notified_ms=opened_ms,
        verify_readings=0,
        reopened=0,
    )
    session.add(case)
    await session.flush()
    events = [(state, ms(at), "transition") for state, at in past.times.items()]
    events += [(past.status, ms(at), "escalate") for at in past.escalated]
    for to, at_ms, action in events:
        session.add(
            CaseEventRow(
                case_id=case.id, at_ms=at_ms, actor="crew", action=action, to_status=to, note=""
            )
        )


async def stats(api: RunningApi, **params: str) -> dict[str, Any]:
    answer = await api.client("viewer").get("/api/v1/stats/units", params=params)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def figures(unit: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(
        unit[k]
        for k in (
            "covers",
            "problem_covers",
            "remediated_covers",
            "remediated_share",
            "meets_target",
            "median_ack_s",
            "median_resolve_s",
            "overdue_cases",
            "rank",
        )
    )


async def test_january_figures_by_hand(api: RunningApi) -> None:
    body = await stats(api, month="2027-01")
    assert body["period_start"] == "2027-01-01T00:00:00+08:00"
    assert body["period_end"] == "2027-02-01T00:00:00+08:00"
    assert body["target_share"] == 0.4
    units = {u["unit_code"]: u for u in body["units"]}
    # WATER: problems W1 (open again), W2 (verified), W3 (on site); W4's case cancelled.
    # Acknowledged in January after 4 and 10 minutes; resolved after 2 hours.
    assert figures(units["WATER"]) == (5, 3, 1, 1 / 3, False, 420.0, 7200.0, 1, 3)
    # DRAIN: D1 verified, D2 only in February. Acknowledged after 20 and 6 minutes;
    # resolved in January: D1 after 5 hours (D2's resolution falls in February).
    assert figures(units["DRAIN"]) == (2, 2, 1, 0.5, True, 780.0, 18000.0, 1, 1)
    # GAS ties with DRAIN: the same share and overdue count, the same rank.
    assert figures(units["GAS"]) == (2, 2, 1, 0.5, True, 1800.0, 3600.0, 1, 1)
    assert figures(units["TOWN-1"]) == (0, 0, 0, None, None, None, None, 0, None)
    assert [u["unit_code"] for u in body["units"]] == ["DRAIN", "GAS", "WATER", "TOWN-1"]


async def test_december_and_the_default_month(api: RunningApi) -> None:
    december = {u["unit_code"]: u for u in (await stats(api, month="2026-12"))["units"]}
    assert figures(december["WATER"]) == (5, 1, 1, 1.0, True, 300.0, 7200.0, 0, 1)
    assert figures(december["DRAIN"]) == (2, 0, 0, None, None, None, None, 0, None)
    now = await stats(api)  # the clock says 15 January 2027
    assert now["month"] == "2027-01"
    november = await stats(api, month="2026-11")
    assert {u["covers"] for u in november["units"]} == {0}  # registered in December
    in_utc = {u["unit_code"]: u for u in (await stats(api, month="2027-01", tz="UTC"))["units"]}
    # In UTC, D2's resolution (01:00 on 1 February in Shanghai) is still in January.
    assert in_utc["DRAIN"]["median_resolve_s"] == (18000.0 + 37 * 3600.0) / 2
    for bad in ("2027-1", "2027-13", "27-01", "1999-01"):
        answer = await api.client("viewer").get("/api/v1/stats/units", params={"month": bad})
        assert (answer.status_code, answer.json()["code"]) == (400, "bad_month"), bad
