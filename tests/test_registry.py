"""The registry store on SQLite and PostgreSQL: CRUD, constraints, owners, bindings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import SecretStr, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.registry_errors import Conflict, Invalid, NotFound
from core.registry_schemas import (
    CoverCreate,
    CoverState,
    CoverUpdate,
    DeviceCreate,
    DeviceUpdate,
    EndReason,
    RoadCreate,
    ThresholdOverrides,
    Unit,
    UnitKind,
    UnitUpdate,
    cover_number_problem,
)
from tests.db_fixtures import (
    BACKENDS,
    WATER,
    add_units,
    fresh_database_url,
    migrated_sessions,
)
from tests.servers import MosquittoServer

pytestmark = pytest.mark.asyncio

WATER_COVER = "4112030101000001"  # Luoyang Laocheng (411203), class 01 01: water supply
SEWAGE_COVER = "4112030102000001"
ORPHAN_COVER = "4112030114000001"  # class 01 14: owner unknown


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "registry")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated_sessions(database_url) as made:
        await add_units(made)
        yield made


def cover(cover_id: str = WATER_COVER, **fields: object) -> CoverCreate:
    values: dict[str, object] = {
        "cover_id": cover_id,
        "owner_unit": "WATER",
        "road": "Zhongzhou Road",
        "lon": 112.4539,
        "lat": 34.6197,
    }
    values.update(fields)
    return CoverCreate.model_validate(values)


async def version(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with db.transaction(sessions, write=False) as session:
        return await registry.registry_version(session=session)


# -- units ------------------------------------------------------------------------------


async def test_units_are_created_read_listed_and_updated(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    child = Unit(
        code="WATER-N",
        name="Water supply, north depot",
        kind=UnitKind.WATER_SUPPLY,
        parent="WATER",
        webhook_url="https://hooks.example/water-n",
        webhook_secret=SecretStr("s3cret-key-for-hmac"),
        supervisor_contact="Wang Li, 0379-6000000",
    )
    async with db.transaction(sessions) as session:
        created = await registry.create_unit(session=session, unit=child)
    async with db.transaction(sessions) as session:
        found = await registry.get_unit(session=session, code="WATER-N")
        water = await registry.list_units(session=session, kind=UnitKind.WATER_SUPPLY)
    assert found == created
    assert found.parent == "WATER"
    assert found.webhook_secret is not None
    assert found.webhook_secret.get_secret_value() == "s3cret-key-for-hmac"
    # The public shape never shows the secret.
    assert found.model_dump(mode="json")["webhook_secret"] == "*" * 10
    assert [unit.code for unit in water] == ["WATER", "WATER-N"]

    update = UnitUpdate(name="Water supply, north", webhook_url=None)
    async with db.transaction(sessions) as session:
        changed = await registry.update_unit(session=session, code="WATER-N", update=update)
    assert changed.name == "Water supply, north"
    assert changed.webhook_url is None
    assert changed.supervisor_contact == "Wang Li, 0379-6000000"  # not in the update


async def test_unit_rules(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with db.transaction(sessions) as session:
        with pytest.raises(Conflict) as duplicate:
            await registry.create_unit(session=session, unit=WATER)
        assert (duplicate.value.entity, duplicate.value.key) == ("unit", "WATER")
        orphan = Unit(code="X", name="X", kind=UnitKind.OTHER, parent="NOPE")
        with pytest.raises(Invalid) as no_parent:
            await registry.create_unit(session=session, unit=orphan)
        assert no_parent.value.field == "parent"
        with pytest.raises(Invalid, match="cycle"):
            await registry.update_unit(
                session=session, code="WATER", update=UnitUpdate(parent="WATER")
            )
        with pytest.raises(NotFound):
            await registry.get_unit(session=session, code="NOPE")
    with pytest.raises(ValidationError):
        Unit(code="a/b", name="topic breaker", kind=UnitKind.OTHER)  # ends up in alerts/{code}
    with pytest.raises(ValidationError):
        UnitUpdate(name=None)


# -- cover numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "problem"),
    [
        ("4112030101000001", None),
        ("4112030114999999", None),
        ("4112030104000001", None),  # storm-water grate
        ("411203010100001", "16 digits"),
        ("41120301010000012", "16 digits"),
        ("41120301010000a1", "16 digits"),
        ("9912030101000001", "no province"),
        ("4100000101000001", "whole province"),
        ("4112030201000001", "major class 02"),
        ("4112030113000001", "minor class 13"),  # fire hydrants: not a cover
        ("4112030127000001", "minor class 27"),  # a local extension
        ("4112030101000000", "sequence 000000"),
    ],
)
async def test_cover_numbers_are_checked_against_cjt_214(number: str, problem: str | None) -> None:
    found = cover_number_problem(number)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


async def test_covers_are_created_read_listed_and_updated(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    overrides = ThresholdOverrides(tilt_open_deg=30, water_limit_cm=150)
    async with db.transaction(sessions) as session:
        created = await registry.create_cover(
            session=session,
            cover=cover(
                maintainer_unit="DRAIN",
                depth_cm=220,
                installed_on="2021-05-01",
                flood_prone=True,
                thresholds=overrides,
            ),
        )
        await registry.create_cover(
            session=session, cover=cover(SEWAGE_COVER, owner_unit="DRAIN", road="Kaiyuan Avenue")
        )
    assert created.kind_code == "0101"
    assert created.thresholds == overrides
    async with db.transaction(sessions, write=False) as session:
        found = await registry.get_cover(session=session, cover_id=WATER_COVER)
        of_water = await registry.list_covers(session=session, owner_unit="WATER")
        on_avenue = await registry.list_covers(session=session, road="Kaiyuan Avenue")
        roads = await registry.list_roads(session=session)
    assert found == created
    assert found.created_at.tzinfo is not None
    assert [c.cover_id for c in of_water] == [WATER_COVER]
    assert [c.cover_id for c in on_avenue] == [SEWAGE_COVER]
    assert [(road.name, road.covers) for road in roads] == [
        ("Kaiyuan Avenue", 1),
        ("Zhongzhou Road", 1),
    ]

    update = CoverUpdate(state=CoverState.ABANDONED, thresholds=None, depth_cm=None)
    async with db.transaction(sessions) as session:
        changed = await registry.update_cover(session=session, cover_id=WATER_COVER, update=update)
    assert changed.state is CoverState.ABANDONED
    assert changed.thresholds is None
    assert changed.depth_cm is None
    assert changed.flood_prone is True  # untouched
    assert changed.updated_at >= created.updated_at


async def test_cover_constraints(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with db.transaction(sessions) as session:
        await registry.create_cover(session=session, cover=cover())
    async with db.transaction(sessions) as session:
        with pytest.raises(Conflict):
            await registry.create_cover(session=session, cover=cover())
        with pytest.raises(Invalid) as no_owner:
            await registry.create_cover(session=session, cover=cover(SEWAGE_COVER, owner_unit="X"))
        assert (no_owner.value.field, no_owner.value.reason) == (
            "owner_unit",
            "unit 'X' does not exist",
        )
        with pytest.raises(Invalid) as no_maintainer:
            await registry.create_cover(
                session=session, cover=cover(SEWAGE_COVER, maintainer_unit="X")
            )
        assert no_maintainer.value.field == "maintainer_unit"
        with pytest.raises(NotFound):
            await registry.update_cover(
                session=session, cover_id=SEWAGE_COVER, update=CoverUpdate()
            )
    with pytest.raises(ValidationError, match="minor class 13"):
        cover("4112030113000001")
    with pytest.raises(ValidationError, match="differs from the cover number"):
        cover(kind_code="0102")
    with pytest.raises(ValidationError):
        cover(lat=134.6)  # longitude and latitude swapped
    with pytest.raises(ValidationError, match="cannot be cleared"):
        CoverUpdate(owner_unit=None)


async def test_the_database_itself_refuses_unknown_owners_and_duplicate_numbers(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Below the data functions: SQLite must enforce foreign keys too (a pragma, off by default).
    insert = text(
        "INSERT INTO covers (cover_id, kind_code, owner_unit, road_id, lon, lat, flood_prone,"
        " anti_fall, state, created_at, updated_at) VALUES (:id, '0101', :owner, :road, 112.4,"
        " 34.6, false, false, 'in_service', :now, :now)"
    )
    async with db.transaction(sessions) as session:
        road = await registry.create_road(session=session, road=RoadCreate(name="Jiefang Road"))
    now = datetime.now(UTC)
    with pytest.raises(IntegrityError):
        async with db.transaction(sessions) as session:
            await session.execute(
                insert, {"id": WATER_COVER, "owner": "X", "road": road.id, "now": now}
            )
    async with db.transaction(sessions) as session:
        params = {"id": WATER_COVER, "owner": "WATER", "road": road.id, "now": now}
        await session.execute(insert, params)
    with pytest.raises(IntegrityError):
        async with db.transaction(sessions) as session:
            await session.execute(insert, params)


async def test_a_cover_without_owner_goes_to_its_roads_township(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with db.transaction(sessions) as session:
        await registry.create_road(
            session=session, road=RoadCreate(name="Xigong Lane", township_unit="TOWN-1")
        )
        orphan = await registry.create_cover(
            session=session, cover=cover(ORPHAN_COVER, owner_unit=None, road="Xigong Lane")
        )
    assert orphan.owner_unit == "TOWN-1"
    async with db.transaction(sessions) as session:
        with pytest.raises(Invalid, match="belongs to a township unit, not water_supply"):
            await registry.create_cover(
                session=session, cover=cover("4112030114000002", owner_unit="WATER")
            )
        with pytest.raises(Invalid, match="has no township unit to fall back to"):
            await registry.create_cover(
                session=session, cover=cover("4112030114000003", owner_unit=None)
            )
        with pytest.raises(Invalid, match="only a class-14 cover falls back"):
            await registry.create_cover(session=session, cover=cover(owner_unit=None))
        with pytest.raises(Invalid, match="must stay a township"):
            await registry.update_unit(
                session=session, code="TOWN-1", update=UnitUpdate(kind=UnitKind.OTHER)
            )
        with pytest.raises(Invalid, match="not a township"):
            await registry.create_road(
                session=session, road=RoadCreate(name="Other Road", township_unit="WATER")
            )


async def test_threshold_overrides_keep_their_dead_bands() -> None:
    assert ThresholdOverrides(tilt_warn_deg=8, tilt_clear_deg=4).thresholds() == {
        "tilt_warn_deg": 8,
        "tilt_clear_deg": 4,
    }
    assert ThresholdOverrides(water_limit_cm=120).thresholds() == {}  # not a Thresholds field
    with pytest.raises(ValidationError, match="tilt_clear_deg"):
        ThresholdOverrides(tilt_clear_deg=12, tilt_warn_deg=10)
    with pytest.raises(ValidationError, match="battery_low_v"):
        ThresholdOverrides(battery_low_v=3.5, battery_ok_v=3.4)
    with pytest.raises(ValidationError):
        ThresholdOverrides.model_validate({"tilt_open": 30})  # a typo is not silently ignored


# -- devices and bindings ---------------------------------------------------------------


async def test_devices_keep_only_a_hash_of_their_secret(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    secret = registry.new_device_secret()
    async with db.transaction(sessions) as session:
        device = await registry.create_device(
            session=session, device=DeviceCreate(device_id="SC-0001", model="NB-1"), secret=secret
        )
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0002"))
    assert device.has_credentials
    assert device.report_interval_s == 3600
    async with db.transaction(sessions, write=False) as session:
        stored = (await session.execute(text("SELECT credential_hash FROM devices"))).scalars()
        hashes = [value for value in stored if value is not None]
        assert await registry.device_secret_matches(
            session=session, device_id="SC-0001", secret=secret
        )
        assert not await registry.device_secret_matches(
            session=session, device_id="SC-0001", secret=secret + "x"
        )
        assert not await registry.device_secret_matches(
            session=session, device_id="SC-0002", secret=secret
        )
    assert len(hashes) == 1
    assert secret not in hashes[0]
    assert hashes[0].startswith("$7$")
    with pytest.raises(Invalid, match="at least 16"):
        registry.hash_secret("short")
    async with db.transaction(sessions) as session:
        changed = await registry.update_device(
            session=session, device_id="SC-0002", update=DeviceUpdate(report_interval_s=600)
        )
        with pytest.raises(Conflict):
            await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0002"))
    assert changed.report_interval_s == 600
    with pytest.raises(ValidationError):
        DeviceCreate(device_id="covers/+/x")


async def test_binding_history_survives_a_replaced_sensor(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    async with db.transaction(sessions) as session:
        await registry.create_cover(session=session, cover=cover())
        await registry.create_cover(session=session, cover=cover(SEWAGE_COVER, owner_unit="DRAIN"))
        for device_id in ("SC-0001", "SC-0002"):
            await registry.create_device(session=session, device=DeviceCreate(device_id=device_id))
        await registry.bind_device(
            session=session, device_id="SC-0001", cover_id=WATER_COVER, at=t0
        )
    # SC-0001 is stolen; SC-0002 replaces it a week later, then moves to the sewage cover.
    t1, t2 = t0 + timedelta(days=7), t0 + timedelta(days=30)
    async with db.transaction(sessions) as session:
        await registry.bind_device(
            session=session, device_id="SC-0002", cover_id=WATER_COVER, at=t1
        )
        again = await registry.bind_device(
            session=session, device_id="SC-0002", cover_id=WATER_COVER, at=t2
        )
        assert again.bound_at == t1  # binding to the cover it is on changes nothing
        await registry.bind_device(
            session=session, device_id="SC-0002", cover_id=SEWAGE_COVER, at=t2
        )
    async with db.transaction(sessions, write=False) as session:
        history = await registry.binding_history(session=session, cover_id=WATER_COVER)
        moved = await registry.get_device(session=session, device_id="SC-0002")
        water = await registry.get_cover(session=session, cover_id=WATER_COVER)
        unbound = await registry.list_devices(session=session, bound=False)
    assert [(b.device_id, b.bound_at, b.unbound_at, b.end_reason) for b in history] == [
        ("SC-0001", t0, t1, EndReason.REPLACED),
        ("SC-0002", t1, t2, EndReason.MOVED),
    ]
    assert moved.cover_id == SEWAGE_COVER
    assert water.device_id is None
    assert [device.device_id for device in unbound] == ["SC-0001"]
    async with db.transaction(sessions) as session:
        ended = await registry.unbind_device(session=session, device_id="SC-0002")
        with pytest.raises(NotFound):
            await registry.unbind_device(session=session, device_id="SC-0002")
        with pytest.raises(NotFound):
            await registry.bind_device(session=session, device_id="SC-0009", cover_id=WATER_COVER)
    assert ended.end_reason is EndReason.UNBOUND


async def test_the_database_refuses_two_open_bindings_on_one_cover(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with db.transaction(sessions) as session:
        await registry.create_cover(session=session, cover=cover())
        for device_id in ("SC-0001", "SC-0002"):
            await registry.create_device(session=session, device=DeviceCreate(device_id=device_id))
        await registry.bind_device(session=session, device_id="SC-0001", cover_id=WATER_COVER)
    with pytest.raises(IntegrityError):
        async with db.transaction(sessions) as session:
            await session.execute(
                text(
                    "INSERT INTO device_bindings (device_id, cover_id, bound_at)"
                    " VALUES ('SC-0002', :cover, :now)"
                ),
                {"cover": WATER_COVER, "now": datetime.now(UTC)},
            )


async def test_every_change_moves_the_registry_version(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    before = await version(sessions)
    async with db.transaction(sessions) as session:
        await registry.create_cover(session=session, cover=cover())
    after_cover = await version(sessions)
    async with db.transaction(sessions) as session:
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0001"))
        await registry.bind_device(session=session, device_id="SC-0001", cover_id=WATER_COVER)
    after_binding = await version(sessions)
    with pytest.raises(Conflict):
        async with db.transaction(sessions) as session:
            await registry.create_cover(session=session, cover=cover())
    assert before < after_cover < after_binding == await version(sessions)


async def test_concurrent_writers_wait_for_each_other(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    # Read, then write, in several transactions at once: on SQLite a deferred transaction
    # would fail with "database is locked"; BEGIN IMMEDIATE makes them queue instead.
    async def add(number: int) -> None:
        async with db.transaction(sessions) as session:
            await registry.registry_version(session=session)
            await asyncio.sleep(0.01)
            await registry.create_device(
                session=session, device=DeviceCreate(device_id=f"SC-{number:04d}")
            )

    await asyncio.gather(*(add(number) for number in range(8)))
    async with db.transaction(sessions, write=False) as session:
        assert len(await registry.list_devices(session=session)) == 8


# -- engine --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///./smartcover.db", "sqlite+aiosqlite:///./smartcover.db"),
        (
            "sqlite:////var/lib/smartcover/db.sqlite",
            "sqlite+aiosqlite:////var/lib/smartcover/db.sqlite",
        ),
        (
            "postgresql://u:p%40ss@db:5432/smartcover",
            "postgresql+asyncpg://u:p%40ss@db:5432/smartcover",
        ),
        ("postgres://u@db/smartcover", "postgresql+asyncpg://u@db/smartcover"),
        ("postgresql+asyncpg://u@db/smartcover", "postgresql+asyncpg://u@db/smartcover"),
    ],
)
async def test_database_urls_get_their_async_driver(given: str, expected: str) -> None:
    assert db.async_url(given) == expected


@pytest.mark.parametrize("url", ["mysql://u@db/x", "postgresql+psycopg2://u@db/x", "not a url"])
async def test_unsupported_database_urls_are_refused(url: str) -> None:
    with pytest.raises(db.DatabaseUrlError):
        db.async_url(url)


# -- credentials on a real broker ------------------------------------------------------


async def test_a_stored_hash_is_a_mosquitto_password_entry(tmp_path: Path) -> None:
    secret = registry.new_device_secret()
    passwords = tmp_path / "passwords"
    passwords.write_text(f"SC-0001:{registry.hash_secret(secret)}\n", encoding="utf-8")
    passwords.chmod(0o600)
    with MosquittoServer(tmp_path / "broker", password_file=passwords) as broker:

        async def publish(password: str) -> int:
            process = await asyncio.create_subprocess_exec(
                *("mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1"),
                *("-u", "SC-0001", "-P", password, "-t", "covers/SC-0001/telemetry", "-m", "{}"),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await asyncio.wait_for(process.wait(), timeout=10)

        assert await publish(secret) == 0
        assert await publish("wrong-" + secret) != 0
