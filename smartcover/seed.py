"""A seeded pilot registry: a few units and roads, covers with sensors, for demos and tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import registry
from core.db import transaction
from core.registry_schemas import CoverCreate, DeviceCreate, RoadCreate, Unit, UnitKind

ADMIN_CODE = "411203"  # the district's administrative code (six digits of CJ/T 214)
CENTRE = (112.4540, 34.6197)  # lon, lat the pilot's covers are scattered around

# (code, name, kind, minor classes it owns)
UNITS = (
    ("TS-XIGONG", "西工街道办事处", UnitKind.TOWNSHIP, ()),
    ("WS-CITY", "市供水有限公司", UnitKind.WATER_SUPPLY, ("01",)),
    ("DR-CITY", "市排水管理处", UnitKind.DRAINAGE, ("02", "03")),
    ("PW-GRID", "供电公司城区分公司", UnitKind.POWER, ("05",)),
    ("TC-UNICOM", "联通城区分公司", UnitKind.TELECOM, ("07",)),
    ("GS-CITY", "市燃气公司", UnitKind.GAS, ("11",)),
)
ROADS = ("中州中路", "九都西路", "凯旋东路", "王城大道", "纱厂南路", "唐宫中路")
LOW_LYING_ROAD = "纱厂南路"  # where the storm floods first


@dataclass(frozen=True, slots=True)
class SeededCover:
    cover_id: str
    device_id: str
    owner_unit: str
    road: str
    lon: float
    lat: float
    depth_cm: float
    flood_prone: bool


def _owner_of(minor: str) -> str:
    return next(code for code, _, _, minors in UNITS if minor in minors)


def demo_device_id(index: int) -> str:
    return f"SC-{index + 1:05d}"


def plan_pilot(
    count: int, seed: int = 7, device_id: Callable[[int], str] = demo_device_id
) -> list[SeededCover]:
    """The covers of a pilot, the same for the same seed; `device_id` names the sensors."""
    rng = random.Random(seed)  # noqa: S311 -- a reproducible layout, not cryptography
    minors = [minor for _, _, _, owned in UNITS for minor in owned]
    covers = []
    for index in range(count):
        road = ROADS[index % len(ROADS)]
        minor = "03" if road == LOW_LYING_ROAD and index % 2 == 0 else rng.choice(minors)
        along = index // len(ROADS) / max(1, count // len(ROADS))
        lon = CENTRE[0] + (ROADS.index(road) - 2.5) * 0.004 + rng.uniform(-0.0004, 0.0004)
        lat = CENTRE[1] - 0.012 + along * 0.024
        covers.append(
            SeededCover(
                cover_id=f"{ADMIN_CODE}01{minor}{index + 1:06d}",
                device_id=device_id(index),
                owner_unit=_owner_of(minor),
                road=road,
                lon=round(lon, 6),
                lat=round(lat, 6),
                depth_cm=float(rng.choice((150, 180, 200, 250))),
                flood_prone=road == LOW_LYING_ROAD,
            )
        )
    return covers


async def seed_pilot(
    sessions: async_sessionmaker[AsyncSession],
    covers: list[SeededCover],
    *,
    report_interval_s: int = 60,
) -> None:
    """Writes units, roads, covers and bound devices; a registry already seeded is left."""
    async with transaction(sessions) as session:
        if await registry.list_units(session=session):
            return
        for code, name, kind, _ in UNITS:
            await registry.create_unit(
                session=session,
                unit=Unit(code=code, name=name, kind=kind, webhook_secret=SecretStr("demo-secret")),
            )
        for road in ROADS:
            await registry.create_road(
                session=session, road=RoadCreate(name=road, township_unit=UNITS[0][0])
            )
        for cover in covers:
            await _seed_cover(session, cover, report_interval_s)


async def _seed_cover(session: AsyncSession, cover: SeededCover, report_interval_s: int) -> None:
    await registry.create_cover(
        session=session,
        cover=CoverCreate(
            cover_id=cover.cover_id,
            owner_unit=cover.owner_unit,
            road=cover.road,
            lon=cover.lon,
            lat=cover.lat,
            depth_cm=cover.depth_cm,
            flood_prone=cover.flood_prone,
            anti_fall=True,
        ),
    )
    await registry.create_device(
        session=session,
        device=DeviceCreate(
            device_id=cover.device_id, model="SC-T3", report_interval_s=report_interval_s
        ),
    )
    await registry.bind_device(session=session, device_id=cover.device_id, cover_id=cover.cover_id)
