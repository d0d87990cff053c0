"""The registry cache on SQLite and PostgreSQL: look-ups, refresh on change, unregistered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.clock import wall_clock_ms
from core.registry_cache import RegistryCache, RegistryChange
from core.registry_schemas import (
    CoverCreate,
    CoverUpdate,
    DeviceCreate,
    ThresholdOverrides,
    Unit,
    UnitKind,
)
from core.unregistered import MAX_PENDING, UnregisteredLog, list_unregistered
from tests.db_fixtures import BACKENDS, add_units, fresh_database_url, migrated_sessions

pytestmark = pytest.mark.asyncio

COVER = "4112030101000001"
OTHER = "4112030102000001"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "cache")


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with migrated_sessions(database_url) as made:
        await add_units(made)
        async with db.transaction(made) as session:
            for number, owner in ((COVER, "WATER"), (OTHER, "DRAIN")):
                await registry.create_cover(
                    session=session,
                    cover=CoverCreate(
                        cover_id=number,
                        owner_unit=owner,
                        road="Zhongzhou Road",
                        lon=112.45,
                        lat=34.62,
                        depth_cm=200,
                    ),
                )
            await registry.create_device(
                session=session, device=DeviceCreate(device_id="SC-0001", report_interval_s=600)
            )
            await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0002"))
            await registry.bind_device(session=session, device_id="SC-0001", cover_id=COVER)
        yield made


async def test_lookups_answer_from_memory_after_a_refresh(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    assert cache.lookup("SC-0001") is None  # nothing before the first refresh
    assert await cache.refresh()

    bound = cache.lookup("SC-0001")
    assert bound is not None
    assert (bound.cover_id, bound.owner_unit, bound.report_interval_s) == (COVER, "WATER", 600)
    assert bound.thresholds is None
    assert bound.cover is not None
    assert (bound.cover.depth_cm, bound.cover.road, bound.cover.state) == (
        200,
        "Zhongzhou Road",
        "in_service",
    )
    spare = cache.lookup("SC-0002")  # registered, on no cover
    assert spare is not None
    assert (spare.cover_id, spare.report_interval_s) == (None, 3600)
    assert cache.lookup("SC-9999") is None
    assert cache.cover(OTHER) is not None
    assert (len(cache), cache.device_count) == (2, 2)
    # Repeated values are one object each, whatever the number of covers.
    other = cache.cover(OTHER)
    assert other is not None
    assert other.road is bound.cover.road


async def test_refresh_reloads_only_when_the_registry_changed(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    await cache.refresh()
    loaded = cache.version
    assert not await cache.refresh()

    overrides = ThresholdOverrides(tilt_open_deg=30, water_limit_cm=150)
    async with db.transaction(sessions) as session:
        await registry.update_cover(
            session=session, cover_id=COVER, update=CoverUpdate(thresholds=overrides)
        )
        await registry.bind_device(session=session, device_id="SC-0002", cover_id=OTHER)
        await registry.create_unit(
            session=session,
            unit=Unit(
                code="GAS",
                name="Gas company",
                kind=UnitKind.GAS,
                webhook_url="https://hooks.example/gas",
            ),
        )
    stale = cache.lookup("SC-0002")
    assert stale is not None
    assert stale.cover_id is None  # until the refresh

    assert await cache.refresh()
    assert cache.version > loaded
    moved = cache.lookup("SC-0002")
    bound = cache.lookup("SC-0001")
    assert moved is not None
    assert bound is not None
    assert (moved.cover_id, moved.owner_unit) == (OTHER, "DRAIN")
    assert bound.thresholds == overrides
    assert cache.webhook_units() == frozenset({"GAS"})


async def test_unregistered_devices_are_counted_and_listed_until_registered(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    await cache.refresh()
    log = UnregisteredLog(sessions, is_registered=lambda d: cache.lookup(d) is not None)
    log.seen("SC-9999", 1_000_000)
    log.seen("SC-9999", 1_005_000)
    log.seen("SC-7777", 1_002_000)
    assert await log.flush() == 2
    assert await log.flush() == 0  # nothing new

    # A second process (or a restart) adds to the same rows.
    other = UnregisteredLog(sessions, is_registered=lambda d: False)
    other.seen("SC-9999", 1_009_000)
    await other.flush()
    async with db.transaction(sessions, write=False) as session:
        listed = await list_unregistered(session=session, limit=10)
    assert [(d.device_id, d.readings) for d in listed] == [("SC-9999", 3), ("SC-7777", 1)]
    nine = listed[0]
    assert nine.first_seen_at == datetime.fromtimestamp(1_000, tz=UTC)
    assert nine.last_seen_at == datetime.fromtimestamp(1_009, tz=UTC)

    # Registered: off the list, and a count still in memory does not put it back.
    log.seen("SC-9999", 1_010_000)
    async with db.transaction(sessions) as session:
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-9999"))
    await cache.refresh()
    await log.flush()
    async with db.transaction(sessions, write=False) as session:
        listed = await list_unregistered(session=session, limit=10)
    assert [d.device_id for d in listed] == ["SC-7777"]


async def test_the_count_of_unknown_devices_is_bounded(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    log = UnregisteredLog(sessions, is_registered=lambda d: False)
    for number in range(MAX_PENDING + 5):
        log.seen(f"X-{number}", 1_000_000)
    assert (log.pending, log.overflowed) == (MAX_PENDING, 5)


async def test_a_reading_of_a_device_registered_meanwhile_refreshes_the_cache_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    await cache.refresh()
    loaded = cache.version
    async with db.transaction(sessions) as session:  # as another process would
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0003"))
    arrived_ms = wall_clock_ms()
    await cache.refresh_for_unknown(arrived_ms)
    assert cache.version > loaded
    assert cache.lookup("SC-0003") is not None

    # The cache was checked after that reading arrived: no second query for it.
    async with db.transaction(sessions) as session:
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0004"))
    await cache.refresh_for_unknown(arrived_ms)
    assert cache.lookup("SC-0004") is None


async def test_watch_refreshes_until_stopped(sessions: async_sessionmaker[AsyncSession]) -> None:
    cache = RegistryCache(sessions)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(cache.watch(stop, interval_s=0.05))
        for _ in range(100):
            if cache.loaded:
                break
            await asyncio.sleep(0.01)
        async with db.transaction(sessions) as session:
            await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0003"))
        for _ in range(100):
            if cache.lookup("SC-0003") is not None:
                break
            await asyncio.sleep(0.01)
        stop.set()
    assert cache.lookup("SC-0003") is not None


def _view(cache: RegistryCache) -> dict[str, tuple[object, ...] | None]:
    """What evaluation sees of every device, to compare two caches."""
    seen: dict[str, tuple[object, ...] | None] = {}
    for device_id in ("SC-0001", "SC-0002", "SC-0003"):
        binding = cache.lookup(device_id)
        seen[device_id] = (
            None
            if binding is None
            else (binding.cover_id, binding.owner_unit, binding.thresholds, binding.cover)
        )
    return seen


async def test_applying_an_own_write_matches_a_full_reload(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    await cache.refresh()
    overrides = ThresholdOverrides(displacement_raise_mm=30)
    async with db.transaction(sessions) as session:
        await registry.update_cover(
            session=session, cover_id=COVER, update=CoverUpdate(thresholds=overrides)
        )
        # SC-0002 replaces SC-0001 on COVER: SC-0001 is on no cover afterwards.
        await registry.bind_device(session=session, device_id="SC-0002", cover_id=COVER)
        steps = session.info[registry.VERSION_STEPS]
    await cache.apply(RegistryChange(steps=steps, covers={COVER}, devices={"SC-0002"}))

    reloaded = RegistryCache(sessions)
    await reloaded.refresh()
    assert cache.version == reloaded.version
    assert _view(cache) == _view(reloaded)
    moved = cache.lookup("SC-0002")
    assert moved is not None
    assert (moved.cover_id, moved.thresholds) == (COVER, overrides)
    replaced = cache.lookup("SC-0001")
    assert replaced is not None
    assert replaced.cover_id is None


async def test_a_write_by_someone_else_in_between_makes_apply_reload_everything(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    cache = RegistryCache(sessions)
    await cache.refresh()
    async with db.transaction(sessions) as session:  # another process, unannounced
        await registry.create_device(session=session, device=DeviceCreate(device_id="SC-0003"))
    async with db.transaction(sessions) as session:  # this process's own write
        await registry.bind_device(session=session, device_id="SC-0002", cover_id=OTHER)
        steps = session.info[registry.VERSION_STEPS]
    await cache.apply(RegistryChange(steps=steps, covers={OTHER}, devices={"SC-0002"}))
    assert cache.lookup("SC-0003") is not None  # only a full reload knows of it
    reloaded = RegistryCache(sessions)
    await reloaded.refresh()
    assert _view(cache) == _view(reloaded)
