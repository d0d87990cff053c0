"""`sim --register`: the fleet as a census the registry imports, owner units, intervals."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import db, registry
from core.census import import_census, read_census
from core.registry_schemas import Unit, UnitKind
from device_sim.fleet import GeneratedFleet, SimCover
from device_sim.register import census_csv, service_interval_s, unit_kind
from tests.db_fixtures import migrated_sessions


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
