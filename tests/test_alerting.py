"""The alert engine and case desk on real databases (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import MINUTE_MS, CaseDesk, CasePolicy, CoverInfo, IllegalTransition
from alerting.directory import StaticDirectory
from alerting.engine import AlertEngine, AlertMetrics, CoverContext
from alerting.models import (
    AlertRow,
    CaseEventRow,
    CaseRow,
    DeliveryRow,
    DeviceProgress,
    OutboxRow,
)
from alerting.rules import CoverRule
from core.contract import Reading
from core.db import Base, transaction
from tests.db_fixtures import BACKENDS, fresh_database_url, migrated_sessions

pytestmark = pytest.mark.asyncio

T0 = 1_800_000_000_000  # a fixed "now" in epoch ms
ROAD = "Renmin Road"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "alerting")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated_sessions(database_url) as migrated:  # the real schema, migrations
        yield migrated


def directory() -> StaticDirectory:
    def context(cover: str, unit: str, depth: float = 200, flood: bool = False) -> CoverContext:
        return CoverContext(
            CoverInfo(cover, unit, ROAD), CoverRule(depth_cm=depth, flood_prone=flood), 60
        )

    return StaticDirectory(
        [
            ("dev-1", context("4112030102000001", "WS01")),
            ("dev-2", context("4112030103000002", "DR01")),
            ("dev-3", context("4112030103000003", "DR01")),
            ("dev-4", context("4112030103000004", "DR01", flood=True)),
        ],
        webhook_units=["WS01"],
    )


def make_engine(
    sessions: async_sessionmaker[AsyncSession], clock: Clock, policy: CasePolicy | None = None
) -> AlertEngine:
    return AlertEngine(
        sessions=sessions,
        directory=directory(),
        policy=policy or CasePolicy(),
        metrics=AlertMetrics(CollectorRegistry()),
        clock_ms=clock,
    )


def reading(
    device: str, ts: int, *, tilt: float = 0.5, disp: float = 0.0, water: float = 40.0
) -> Reading:
    return Reading(device, ts % 2**32, ts, tilt, disp, water, 3.6)


async def rows(sessions: async_sessionmaker[AsyncSession], model: type[Base]) -> list[Base]:
    async with transaction(sessions, write=False) as session:
        return list(await session.scalars(select(model)))


async def work_case(
    sessions: async_sessionmaker[AsyncSession], case_id: int, actor: str, now_ms: int
) -> None:
    """The crew's three steps: acknowledged, on site, resolved."""
    async with transaction(sessions) as session:
        desk = CaseDesk(session, CasePolicy())
        for status in ("acknowledged", "on_site", "resolved"):
            await desk.transition(
                case_id=case_id, to=status, actor=actor, note=f"{status} by crew", now_ms=now_ms
            )


async def strike(
    engine: AlertEngine, sessions: async_sessionmaker[AsyncSession], over_limit: Reading
) -> CaseRow:
    """Evaluates one over-limit reading (received at T0) and returns the one case it opened."""
    engine.evaluate(over_limit, T0)
    await engine.commit_pending()
    [case] = await cases_of(sessions)
    return case


async def cases_of(sessions: async_sessionmaker[AsyncSession]) -> list[CaseRow]:
    return [row for row in await rows(sessions, CaseRow) if isinstance(row, CaseRow)]


async def test_strike_opens_a_critical_case_for_the_owner(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    engine.evaluate(reading("dev-1", T0 - 2000), T0)
    case = await strike(engine, sessions, reading("dev-1", T0 - 1000, disp=35.0))
    assert (case.cover_id, case.unit_code, case.severity) == (
        "4112030102000001",
        "WS01",
        "critical",
    )
    assert case.status == "dispatched"  # routed to the owner unit at once
    assert case.deadlines == {
        "acknowledged": T0 + 10 * MINUTE_MS,
        "on_site": T0 + 30 * MINUTE_MS,
        "resolved": T0 + 360 * MINUTE_MS,
    }
    [alert] = [a for a in await rows(sessions, AlertRow) if isinstance(a, AlertRow)]
    assert (alert.kind, alert.status, alert.case_id, alert.value) == (
        "cover_displaced",
        "active",
        case.id,
        35.0,
    )
    assert alert.raised_ms == T0 - 1000
    assert alert.received_ms == T0
    assert alert.committed_ms == T0
    types = sorted(o.type for o in await rows(sessions, OutboxRow) if isinstance(o, OutboxRow))
    assert types == ["alert.raised", "case.changed", "case.opened"]
    channels = {
        (d.channel) for d in await rows(sessions, DeliveryRow) if isinstance(d, DeliveryRow)
    }
    assert channels == {"mqtt", "webhook"}  # WS01 has a webhook


async def test_lorry_spike_causes_no_case(sessions: async_sessionmaker[AsyncSession]) -> None:
    engine = make_engine(sessions, Clock())
    for offset, tilt in enumerate([0.5, 25.0, 0.4, 0.5]):
        engine.evaluate(reading("dev-1", T0 + offset * 1000, tilt=tilt), T0)
    await engine.commit_pending()
    assert await cases_of(sessions) == []
    assert await rows(sessions, AlertRow) == []


async def test_crew_workflow_and_sensor_verification(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    case = await strike(engine, sessions, reading("dev-1", T0, tilt=60.0))
    await work_case(sessions, case.id, "crew:WS01", clock.now)
    # Normal readings: the alert clears, then the fix holds through the window.
    for _minute in range(1, 40):
        clock.advance(MINUTE_MS)
        engine.evaluate(reading("dev-1", clock.now), clock.now)
        await engine.run_timers()
    await engine.commit_pending()
    [case] = await cases_of(sessions)
    assert case.status == "verified"
    timeline = [
        (e.action, e.to_status, e.actor)
        for e in await rows(sessions, CaseEventRow)
        if isinstance(e, CaseEventRow)
    ]
    assert ("transition", "verified", "system:sensor") in timeline
    assert ("transition", "acknowledged", "crew:WS01") in timeline


async def test_recurrence_before_verification_reopens(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    case = await strike(engine, sessions, reading("dev-2", T0, disp=40.0))
    await work_case(sessions, case.id, "crew", clock.now)
    for offset in range(1, 4):  # the alert clears
        engine.evaluate(reading("dev-2", T0 + offset * 1000), T0)
    engine.evaluate(reading("dev-2", T0 + 5000, disp=30.0), T0)  # and comes back
    await engine.commit_pending()
    [case] = await cases_of(sessions)
    assert (case.status, case.reopened) == ("dispatched", 1)


async def test_illegal_transition_names_the_allowed_ones(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    engine = make_engine(sessions, Clock())
    case = await strike(engine, sessions, reading("dev-1", T0, tilt=60.0))
    with pytest.raises(IllegalTransition) as caught:
        async with transaction(sessions) as session:
            await CaseDesk(session, CasePolicy()).transition(
                case_id=case.id, to="closed", actor="crew", note="", now_ms=T0
            )
    assert caught.value.allowed == ["acknowledged", "cancelled"]


async def test_missed_deadline_escalates_once_and_critical_is_renotified(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    engine.evaluate(reading("dev-1", T0, tilt=60.0), T0)
    await engine.commit_pending()
    for _ in range(25):  # 25 minutes without acknowledgement
        clock.advance(MINUTE_MS)
        await engine.run_timers()
    [case] = await cases_of(sessions)
    assert case.overdue
    assert case.escalated == ["acknowledged"]
    types = [o.type for o in await rows(sessions, OutboxRow) if isinstance(o, OutboxRow)]
    assert types.count("case.escalated") == 1
    assert types.count("case.renotified") == 5  # every 5 minutes, bounded


async def test_storm_on_one_road_is_one_incident(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    engine = make_engine(sessions, Clock())
    for index, device in enumerate(("dev-2", "dev-3", "dev-4")):
        engine.evaluate(reading(device, T0 + index, water=180.0), T0)
        await engine.commit_pending()
    cases = await cases_of(sessions)
    assert len(cases) == 3
    assert len({c.incident_id for c in cases}) == 1
    assert cases[0].incident_id is not None
    severities = {c.cover_id: c.severity for c in cases}
    assert severities["4112030103000004"] == "critical"  # flood-prone
    assert severities["4112030103000002"] == "major"


async def test_restart_neither_loses_nor_duplicates(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    first = make_engine(sessions, clock)
    first.evaluate(reading("dev-1", T0, disp=40.0), T0)
    await first.close()
    second = make_engine(sessions, clock)
    await second.load()
    # The broker redelivers what was not acknowledged, and more of the same alarm arrives.
    second.evaluate(reading("dev-1", T0, disp=40.0), T0)
    second.evaluate(reading("dev-1", T0 + 1000, disp=41.0), T0)
    await second.commit_pending()
    assert len(await rows(sessions, AlertRow)) == 1
    assert len(await cases_of(sessions)) == 1
    # And a buffered, older normal reading does not clear it.
    for offset in (1, 2, 3):
        second.evaluate(reading("dev-1", T0 - offset * 1000), T0)
    await second.commit_pending()
    [alert] = [a for a in await rows(sessions, AlertRow) if isinstance(a, AlertRow)]
    assert alert.status == "active"


async def test_device_progress_is_inserted_then_updated_and_reloaded(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    engine = make_engine(sessions, Clock())
    engine.evaluate(reading("dev-1", T0), T0)
    engine.evaluate(reading("dev-2", T0 + 5), T0 + 10)
    await engine.flush_progress()  # both rows new
    engine.evaluate(reading("dev-1", T0 + 2000), T0 + 2500)
    engine.evaluate(reading("dev-1", T0 + 1000), T0 + 3000)  # late: ts stays, seen moves
    await engine.flush_progress()  # one row updated, the other untouched
    stored = {
        row.device_id: (row.last_ts_ms, row.last_seen_ms)
        for row in await rows(sessions, DeviceProgress)
        if isinstance(row, DeviceProgress)
    }
    assert stored == {"dev-1": (T0 + 2000, T0 + 3000), "dev-2": (T0 + 5, T0 + 10)}


async def test_database_enforces_one_active_alert_and_one_open_case(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    engine = make_engine(sessions, Clock())
    engine.evaluate(reading("dev-1", T0, disp=40.0), T0)
    await engine.commit_pending()
    with pytest.raises(IntegrityError):
        async with transaction(sessions) as session:
            session.add(
                AlertRow(
                    cover_id="4112030102000001",
                    kind="cover_displaced",
                    severity="critical",
                    status="active",
                    raised_ms=T0,
                )
            )
    with pytest.raises(IntegrityError):
        async with transaction(sessions) as session:
            session.add(
                CaseRow(
                    cover_id="4112030102000001",
                    unit_code="WS01",
                    severity="critical",
                    status="open",
                    kinds=[],
                    opened_ms=T0,
                    state_times={},
                    deadlines={},
                    escalated=[],
                    overdue=False,
                    last_notified_ms=T0,
                    verify_readings=0,
                    reopened=0,
                )
            )


async def test_device_silence_raised_and_cleared(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    engine.evaluate(reading("dev-3", T0), T0)
    clock.advance(3 * 60_000 + 1)  # three report intervals of 60 s
    await engine.run_timers()
    await engine.commit_pending()
    async with transaction(sessions, write=False) as session:
        active = await session.scalar(
            select(func.count())
            .select_from(AlertRow)
            .where(AlertRow.kind == "device_silent", AlertRow.status == "active")
        )
    assert active == 1
    engine.evaluate(reading("dev-3", clock.now), clock.now)
    await engine.commit_pending()
    async with transaction(sessions, write=False) as session:
        active = await session.scalar(
            select(func.count())
            .select_from(AlertRow)
            .where(AlertRow.kind == "device_silent", AlertRow.status == "active")
        )
    assert active == 0


async def test_resolved_while_still_over_the_limit_goes_back_to_dispatched(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock)
    case = await strike(engine, sessions, reading("dev-1", T0, disp=40.0))
    await work_case(sessions, case.id, "crew", clock.now)  # "fixed", but it is not
    await engine.run_timers()  # the engine learns which cases wait for verification
    clock.advance(60_000)
    engine.evaluate(reading("dev-1", clock.now, disp=38.0), clock.now)
    await engine.commit_pending()
    [case] = await cases_of(sessions)
    assert (case.status, case.reopened) == ("dispatched", 1)


async def test_a_new_alert_after_verification_opens_a_new_case(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    clock = Clock()
    engine = make_engine(sessions, clock, CasePolicy(verify_window_ms=5 * MINUTE_MS))
    first = await strike(engine, sessions, reading("dev-1", T0, tilt=60.0))
    await work_case(sessions, first.id, "crew", clock.now)
    for _ in range(8):  # normal readings: the alert clears and the fix is verified
        clock.advance(MINUTE_MS)
        engine.evaluate(reading("dev-1", clock.now), clock.now)
        await engine.run_timers()
    await engine.commit_pending()
    assert [c.status for c in await cases_of(sessions)] == ["verified"]
    clock.advance(MINUTE_MS)
    engine.evaluate(reading("dev-1", clock.now, disp=50.0), clock.now)
    await engine.commit_pending()
    statuses = sorted((c.id, c.status) for c in await cases_of(sessions))
    assert statuses == [(first.id, "closed"), (first.id + 1, "dispatched")]
