"""The registry in memory for the ingest hot path: device → binding, cover → entry.

Look-ups are plain dict reads (no I/O, no await). `refresh()` asks the database for the
registry version, one tiny query, and reloads everything only when it moved; the new
maps replace the old ones in one assignment, so a look-up never sees half a reload.
When it refreshes: right after this process's own registry writes (before the API
answers), when another process announces a change (PostgreSQL LISTEN/NOTIFY, see
`core.registry_notify`), on a slow safety poll, and when a reading names a device the
cache does not know (`refresh_for_unknown`, rate-limited).
Entries are slotted and share their repeated values (unit codes, roads, thresholds,
depths), which keeps 100,000 covers in a few tens of MB.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import and_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.clock import wall_clock_ms
from core.db import transaction
from core.registry_errors import RegistryError
from core.registry_models import (
    CoverRow,
    DeviceBindingRow,
    DeviceRow,
    RegistryVersionRow,
    RoadRow,
    UnitRow,
)
from core.registry_schemas import ThresholdOverrides

logger = logging.getLogger(__name__)

# Rows fetched per round trip while loading.
_PARTITION = 5000
# The safety poll, for a change whose announcement was missed (SQLite has none at all).
DEFAULT_REFRESH_S = 5.0
# At most one registry check on behalf of unknown devices this often: a flood of readings
# from unregistered devices costs one tiny query per interval, not one per reading, and
# holds the alert committer back by at most this long.
UNKNOWN_CHECK_MS = 50

_T = TypeVar("_T", bound=Hashable)


@dataclass(frozen=True, slots=True)
class CoverEntry:
    """What the hot path and the alerting need of a cover."""

    cover_id: str
    owner_unit: str
    road: str
    state: str
    depth_cm: float | None
    flood_prone: bool
    thresholds: ThresholdOverrides | None  # None: the defaults


@dataclass(frozen=True, slots=True)
class Binding:
    """A registered device and the cover it is mounted on now (None: on no cover)."""

    device_id: str
    report_interval_s: int
    cover: CoverEntry | None

    @property
    def cover_id(self) -> str | None:
        return self.cover.cover_id if self.cover is not None else None

    @property
    def owner_unit(self) -> str | None:
        return self.cover.owner_unit if self.cover is not None else None

    @property
    def thresholds(self) -> ThresholdOverrides | None:
        return self.cover.thresholds if self.cover is not None else None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    version: int
    devices: dict[str, Binding]
    covers: dict[str, CoverEntry]
    webhook_units: frozenset[str]


_EMPTY = _Snapshot(-1, {}, {}, frozenset())


class _Interner:
    """Hands out one shared object per distinct value (codes, roads, depths, thresholds)."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._thresholds: dict[str, ThresholdOverrides] = {}

    def __call__(self, value: _T) -> _T:
        found: _T = self._values.setdefault(value, value)
        return found

    def thresholds(self, data: dict[str, Any] | None) -> ThresholdOverrides | None:
        if not data:
            return None
        key = json.dumps(data, sort_keys=True)
        found = self._thresholds.get(key)
        if found is None:
            found = self._thresholds[key] = ThresholdOverrides(**data)
        return found


class RegistryCache:
    """The registry, held in memory and refreshed when it changes.

    Call `refresh()` once before use (until then every device looks unregistered), then
    periodically or run `watch()`.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._snapshot = _EMPTY
        self._lock = asyncio.Lock()
        self._checked_ms = -1  # when the last refresh read the registry version

    # -- the hot path (sync, O(1)) ---------------------------------------------------

    def lookup(self, device_id: str) -> Binding | None:
        """The device's binding; None when the device is not in the registry."""
        return self._snapshot.devices.get(device_id)

    def cover(self, cover_id: str) -> CoverEntry | None:
        return self._snapshot.covers.get(cover_id)

    def webhook_units(self) -> frozenset[str]:
        """Codes of the units that have a webhook to deliver to."""
        return self._snapshot.webhook_units

    @property
    def version(self) -> int:
        """The registry version loaded; -1 before the first refresh."""
        return self._snapshot.version

    @property
    def loaded(self) -> bool:
        return self._snapshot is not _EMPTY

    def __len__(self) -> int:
        return len(self._snapshot.covers)

    @property
    def device_count(self) -> int:
        return len(self._snapshot.devices)

    # -- loading ---------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Reloads when the registry changed since the last load; True if it reloaded."""
        async with self._lock:
            checked_ms = wall_clock_ms()
            async with transaction(self._sessions, write=False) as session:
                version = await session.scalar(select(RegistryVersionRow.version))
                if version is None:
                    raise RegistryError("no registry version row: run `smartcover db upgrade`")
                if version == self._snapshot.version:
                    self._checked_ms = checked_ms
                    return False
                # Read committed: a change committed while we load is partly seen, but it
                # moved the version past the one read above, so the next refresh reloads.
                snapshot = await _load(session, version)
            self._snapshot = snapshot
            self._checked_ms = checked_ms
        logger.info(
            "registry cache loaded version %d: %d covers, %d devices",
            version,
            len(snapshot.covers),
            len(snapshot.devices),
        )
        return True

    async def apply(self, change: RegistryChange) -> None:
        """After this process's own registry write (committed): load what it touched.

        A whole reload of a city's registry takes a second or more, too long to make every
        edit wait for it. When the registry moved by exactly the write's own steps since
        the cache was loaded, nobody else changed anything, and reloading the touched
        covers and devices is exact; otherwise (or for a census) everything is reloaded.
        """
        if change.everything:
            await self.refresh()
            return
        async with self._lock:
            checked_ms = wall_clock_ms()
            async with transaction(self._sessions, write=False) as session:
                version = await session.scalar(select(RegistryVersionRow.version))
                if version is None or version != self._snapshot.version + change.steps:
                    patched = None
                else:
                    patched = await _patch(session, self._snapshot, change, version)
            if patched is not None:
                self._snapshot = patched
                self._checked_ms = checked_ms
        if patched is None:
            await self.refresh()

    async def refresh_for_unknown(self, received_ms: int) -> None:
        """Before a device is declared unregistered: is the cache older than its reading?

        Nothing to do when a refresh started after the reading arrived (the cache already
        knows what the registry knew then). Otherwise one refresh, at most one per
        UNKNOWN_CHECK_MS (waiting out the rest of the interval).
        """
        if self._checked_ms >= received_ms:
            return
        since_ms = wall_clock_ms() - self._checked_ms
        if since_ms < UNKNOWN_CHECK_MS:
            await asyncio.sleep((UNKNOWN_CHECK_MS - since_ms) / 1000)
            if self._checked_ms >= received_ms:
                return  # another refresh ran meanwhile
        await self.refresh()

    async def watch(self, stop: asyncio.Event, interval_s: float = DEFAULT_REFRESH_S) -> None:
        """Refreshes every `interval_s` until `stop` is set; a database outage only delays."""
        while not stop.is_set():
            try:
                await self.refresh()
            except (SQLAlchemyError, OSError, RegistryError) as exc:
                logger.warning(
                    "registry cache refresh failed (keeping version %d): %s", self.version, exc
                )
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                continue


@dataclass(slots=True)
class RegistryChange:
    """What one registry write touched, for `RegistryCache.apply`."""

    steps: int = 0  # registry versions the write moved (core.registry.bump_version)
    covers: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    units: bool = False
    everything: bool = False  # a census import: reload it all


async def _patch(
    session: AsyncSession, old: _Snapshot, change: RegistryChange, version: int
) -> _Snapshot:
    """The snapshot with the touched covers and the devices on them reloaded."""
    intern = _Interner()
    covers = dict(old.covers)
    for cover_id, entry in (await _load_covers(session, intern, change.covers)).items():
        covers[cover_id] = entry
    # A device is touched when it changed, or when it is (or was) on a touched cover.
    touched = set(change.devices)
    if change.covers:
        touched.update(d for d, b in old.devices.items() if b.cover_id in change.covers)
        bound = await session.scalars(
            select(DeviceBindingRow.device_id).where(
                DeviceBindingRow.cover_id.in_(change.covers),
                DeviceBindingRow.unbound_at.is_(None),
            )
        )
        touched.update(bound)
    devices = dict(old.devices)
    fresh = await _load_devices(session, covers, intern, touched) if touched else {}
    for device_id in touched:
        found = fresh.get(device_id)
        if found is None:
            devices.pop(device_id, None)
        else:
            devices[device_id] = found
    units = old.webhook_units
    if change.units:
        units = frozenset(await _webhook_units(session))
    return _Snapshot(version, devices, covers, units)


async def _webhook_units(session: AsyncSession) -> list[str]:
    return list(await session.scalars(select(UnitRow.code).where(UnitRow.webhook_url.is_not(None))))


async def _load(session: AsyncSession, version: int) -> _Snapshot:
    intern = _Interner()
    covers = await _load_covers(session, intern)
    devices = await _load_devices(session, covers, intern)
    return _Snapshot(version, devices, covers, frozenset(await _webhook_units(session)))


async def _load_covers(
    session: AsyncSession, intern: _Interner, only: set[str] | None = None
) -> dict[str, CoverEntry]:
    query = select(
        CoverRow.cover_id,
        CoverRow.owner_unit,
        RoadRow.name,
        CoverRow.state,
        CoverRow.depth_cm,
        CoverRow.flood_prone,
        CoverRow.thresholds,
    ).join(RoadRow, RoadRow.id == CoverRow.road_id)
    if only is not None:
        query = query.where(CoverRow.cover_id.in_(only))
    covers: dict[str, CoverEntry] = {}
    result = await session.stream(query)
    async for rows in result.partitions(_PARTITION):
        for cover_id, owner, road, state, depth, flood_prone, thresholds in rows:
            covers[cover_id] = CoverEntry(
                cover_id=cover_id,
                owner_unit=intern(owner),
                road=intern(road),
                state=intern(state),
                depth_cm=intern(depth),
                flood_prone=bool(flood_prone),
                thresholds=intern.thresholds(thresholds),
            )
    return covers


async def _load_devices(
    session: AsyncSession,
    covers: dict[str, CoverEntry],
    intern: _Interner,
    only: set[str] | None = None,
) -> dict[str, Binding]:
    query = select(
        DeviceRow.device_id, DeviceRow.report_interval_s, DeviceBindingRow.cover_id
    ).outerjoin(
        DeviceBindingRow,
        and_(
            DeviceBindingRow.device_id == DeviceRow.device_id,
            DeviceBindingRow.unbound_at.is_(None),
        ),
    )
    if only is not None:
        query = query.where(DeviceRow.device_id.in_(only))
    devices: dict[str, Binding] = {}
    result = await session.stream(query)
    async for rows in result.partitions(_PARTITION):
        for device_id, interval, cover_id in rows:
            cover = covers.get(cover_id) if cover_id is not None else None
            devices[device_id] = Binding(device_id, intern(interval), cover)
    return devices
