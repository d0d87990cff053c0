"""`sim --register`: the fleet as a census the registry imports, owner units, intervals;
covers and devices it did not create are refused, never overwritten or rebound."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from core import db, registry
from core.census import import_census, read_census
from core.registry_models import CoverRow, DeviceRow
from core.registry_schemas import Unit, UnitKind
from device_sim.fleet import SIM_SEQUENCE_FIRST, GeneratedFleet, SimCover
from device_sim.register import (
    SIM_MODEL,
    census_csv,
    register_fleet,
    service_interval_s,
    unit_kind,
)
from device_sim.service_api import ServiceApi
from smartcover.cli import app as cli_app
from tests.db_fixtures import migrated_sessions
from tests.test_api_harness import (
    ADMIN_KEY,
    DRAIN_COVER,
    ROAD,
    WATER_COVER,
    RunningApi,
    running_api,
)


@pytest.mark.asyncio
async def test_the_fleets_census_imports_and_a_second_registration_changes_nothing(
    tmp_path: Path,
) -> None:
    covers = GeneratedFleet(60, seed=3).covers()
    assert any(cover.kind_code == "0114" for cover in covers), "a cover without owner too"
    intervals = [service_interval_s(cover.report_interval_s, 60) for cover in covers]
    async with migrated_sessions(f"sqlite:///{tmp_path / 'registry.db'}") as sessions:
        async with db.transaction(sessions) as session:
            for code in sorted({cover.owner_unit for cover in covers}):
                kind = UnitKind(unit_kind(code, covers))
                await registry.create_unit(
                    session=session, unit=Unit(code=code, name=code, kind=kind)
                )
        for expected in ((60, 0, 60, 60), (0, 60, 0, 0)):
            async with db.transaction(sessions) as session:
                report = await import_census(
                    session=session, table=read_census(census_csv(covers, intervals))
                )
            assert report.errors == []
            found = (
                report.inserted,
                report.unchanged,
                report.devices_created,
                report.bindings_made,
            )
            assert found == expected
            assert (report.updated, report.devices_updated) == (0, 0)
        async with db.transaction(sessions, write=False) as session:
            stored = await registry.get_cover(session=session, cover_id=covers[7].cover_id)
            device = await registry.get_device(session=session, device_id=covers[7].device_id)
    assert (stored.owner_unit, stored.road, stored.lon, stored.lat) == (
        covers[7].owner_unit,
        covers[7].road,
        covers[7].lon,
        covers[7].lat,
    )
    assert (stored.depth_cm, stored.flood_prone, stored.device_id) == (
        covers[7].depth_cm,
        covers[7].flood_prone,
        covers[7].device_id,
    )
    assert device.report_interval_s == 60


@pytest.mark.parametrize(
    ("interval_s", "speed", "registered"),
    [
        (300, 1, 300),  # real time: the device's own interval
        (300, 2, 150),  # twice as fast: the service hears it every 150 s
        (61, 1, 61),
        (60, 600, 60),  # never under the registry's minute
        (30, 1, 60),
        (900, 720, 60),
    ],
)
def test_the_registered_interval_is_what_the_service_hears(
    interval_s: int, speed: float, registered: int
) -> None:
    assert service_interval_s(interval_s, speed) == registered


def _cover(number: str, owner: str, kind_code: str = "") -> SimCover:
    return SimCover(number, owner, "黄河路", 111.1, 34.7, f"d-{number[-3:]}", kind_code=kind_code)


def test_units_are_created_of_the_kind_their_covers_need() -> None:
    covers = [
        _cover("4112030114000001", "TS-XIGONG"),  # class 14 (owner unknown): a township
        _cover("4112030103000002", "DR-CITY", "0103"),
        _cover("4112030103000003", "drainage"),
    ]
    assert unit_kind("TS-XIGONG", covers) == "township"
    assert unit_kind("DR-CITY", covers) == "other"
    assert unit_kind("drainage", covers) == "drainage"  # a generated fleet names its kind


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningApi]:
    """The API on a registry of real covers (WATER_COVER with dev-1, DRAIN_COVER with dev-2)."""
    async with running_api(f"sqlite:///{tmp_path / 'registry.db'}") as running:
        yield running


def _fleet_csv(path: Path, *rows: tuple[str, str, str]) -> Path:
    """A census of the simulator's own (`--fleet`): (cover, owner, device) rows."""
    lines = ["cover_id,owner_unit,road,lon,lat,device_id,report_interval_s"]
    lines += [f"{cover},{owner},黄河路,111.1,34.7,{device},60" for cover, owner, device in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _sim_register(api: RunningApi, census: Path) -> Result:
    """`smartcover sim --fleet … --register`; it stops before any broker when refused."""
    target = ["--service", api.url, "--api-key", ADMIN_KEY, "--broker", "mqtt://127.0.0.1:9"]
    return CliRunner().invoke(
        cli_app, ["sim", "--fleet", str(census), "--register", "--duration", "1", *target]
    )


async def _registered(api: RunningApi, cover_id: str) -> tuple[str | None, str, float]:
    async with db.transaction(api.sessions, write=False) as session:
        cover = await registry.get_cover(session=session, cover_id=cover_id)
    return cover.device_id, cover.road, cover.lon


@pytest.mark.asyncio
async def test_register_refuses_a_real_cover_and_leaves_it_as_it_was(
    api: RunningApi, tmp_path: Path
) -> None:
    before = await _registered(api, WATER_COVER)
    new_cover = "4112030103900001"
    census = _fleet_csv(
        tmp_path / "fleet.csv", (new_cover, "DRAIN", "sim-a"), (WATER_COVER, "WATER", "sim-b")
    )
    result = await asyncio.to_thread(_sim_register, api, census)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"cover {WATER_COVER} is in the registry and was not created by the simulator" in (
        message
    )
    assert "device dev-1 on it" in message
    assert await _registered(api, WATER_COVER) == before
    async with db.transaction(api.sessions, write=False) as session:
        # Nothing was written: refused before the first write, not halfway.
        assert await session.get(DeviceRow, "sim-a") is None
        assert await session.get(CoverRow, new_cover) is None


@pytest.mark.asyncio
async def test_register_never_rebinds_a_device_it_did_not_create(
    api: RunningApi, tmp_path: Path
) -> None:
    census = _fleet_csv(tmp_path / "fleet.csv", ("4112030103900001", "DRAIN", "dev-2"))
    result = await asyncio.to_thread(_sim_register, api, census)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "device dev-2 is in the registry and was not created by the simulator" in message
    assert f"on cover {DRAIN_COVER}" in message
    assert (await _registered(api, DRAIN_COVER))[0] == "dev-2"


@pytest.mark.asyncio
async def test_a_generated_fleet_is_registered_beside_real_covers_again_and_again(
    api: RunningApi,
) -> None:
    covers = GeneratedFleet(12, seed=4).covers()
    # The district's covers are numbered from 1, as the harness's: the fleet's never meet them.
    assert all(int(cover.cover_id[10:]) >= SIM_SEQUENCE_FIRST for cover in covers)
    intervals = [60] * len(covers)
    async with ServiceApi(api.url, api_key=ADMIN_KEY) as service:
        first = await register_fleet(service, covers, intervals)
        again = await register_fleet(service, covers, intervals)
        # Its devices may move to its covers elsewhere and back: the covers they left
        # had only ever its devices, so they are still its own.
        elsewhere = GeneratedFleet(12, seed=4, admin_code="411204").covers()
        moved = await register_fleet(service, elsewhere, intervals)
        back = await register_fleet(service, covers, intervals)
    assert (first.covers_created, first.devices_created, first.bindings_made) == (12, 12, 12)
    assert not again.changed
    assert (moved.covers_created, moved.bindings_made) == (12, 12)
    assert (back.covers_created, back.bindings_made) == (0, 12)
    async with db.transaction(api.sessions, write=False) as session:
        device = await registry.get_device(session=session, device_id=covers[0].device_id)
    assert device.model == SIM_MODEL
    assert await _registered(api, WATER_COVER) == ("dev-1", ROAD, 112.45)
