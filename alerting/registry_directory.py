"""The registry as the alerting sees it: covers and rules from the cache, units' contacts."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.cases import CoverInfo
from alerting.engine import CoverContext
from alerting.notifiers import UnitContact
from alerting.rules import CoverRule, Thresholds
from core import registry
from core.db import transaction
from core.registry_cache import CoverEntry, RegistryCache
from core.registry_errors import NotFound

logger = logging.getLogger(__name__)

# Unregistered devices waiting to be recorded; beyond this they are recorded next time.
_MAX_UNNOTED = 10_000


def cover_context(
    entry: CoverEntry, report_interval_s: float, defaults: Thresholds
) -> CoverContext:
    overrides = entry.thresholds
    thresholds = defaults
    water_limit = None
    if overrides is not None:
        given = overrides.model_dump(exclude_none=True)
        water_limit = given.pop("water_limit_cm", None)
        thresholds = Thresholds(**{**_as_dict(defaults), **given})
    rule = CoverRule(
        thresholds=thresholds,
        depth_cm=entry.depth_cm,
        water_limit_cm=water_limit,
        flood_prone=entry.flood_prone,
    )
    info = CoverInfo(entry.cover_id, entry.owner_unit, entry.road)
    return CoverContext(info, rule, report_interval_s)


def _as_dict(thresholds: Thresholds) -> dict[str, object]:
    return {name: getattr(thresholds, name) for name in Thresholds.__slots__}


class RegistryDirectory:
    """`CoverDirectory` over the registry cache; contexts rebuilt when the registry changes."""

    def __init__(self, cache: RegistryCache, defaults: Thresholds) -> None:
        self._cache = cache
        self._defaults = defaults
        self._version = -2
        self._by_device: dict[str, CoverContext | None] = {}
        self._by_cover: dict[str, CoverContext] = {}
        self._unnoted: asyncio.Queue[str] = asyncio.Queue(_MAX_UNNOTED)
        self._seen_unregistered: set[str] = set()

    def _fresh(self) -> None:
        if self._cache.version != self._version:
            self._version = self._cache.version
            self._by_device.clear()
            self._by_cover.clear()

    def cover_of(self, device_id: str) -> CoverContext | None:
        self._fresh()
        try:
            return self._by_device[device_id]
        except KeyError:
            pass
        binding = self._cache.lookup(device_id)
        context = None
        if binding is not None and binding.cover is not None:
            context = cover_context(binding.cover, binding.report_interval_s, self._defaults)
            self._by_cover[context.info.cover_id] = context
        self._by_device[device_id] = context
        return context

    def cover(self, cover_id: str) -> CoverContext | None:
        self._fresh()
        return self._by_cover.get(cover_id)

    def webhook_units(self) -> frozenset[str]:
        return self._cache.webhook_units()

    def note_unregistered(self, device_id: str) -> None:
        if self._cache.lookup(device_id) is not None or device_id in self._seen_unregistered:
            return  # registered but on no cover, or noted already
        self._seen_unregistered.add(device_id)
        with contextlib.suppress(asyncio.QueueFull):
            self._unnoted.put_nowait(device_id)

    async def record_unregistered_forever(self) -> None:
        """Records unregistered devices in the registry, once each (the hot path can't wait)."""
        while True:
            device_id = await self._unnoted.get()
            try:
                if await self._cache.note_unregistered(device_id):
                    logger.warning(
                        "unregistered_device %s: readings stored, not evaluated", device_id
                    )
            except Exception:  # the database is away: forget it, the next reading notes it
                self._seen_unregistered.discard(device_id)
                logger.exception("could not record unregistered device %s", device_id)


class RegistryContacts:
    """Units' webhook URL and secret, read from the registry when a delivery needs them."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def contact(self, unit_code: str) -> UnitContact | None:
        try:
            async with transaction(self._sessions, write=False) as session:
                unit = await registry.get_unit(session=session, code=unit_code)
        except NotFound:
            return None
        secret = unit.webhook_secret.get_secret_value() if unit.webhook_secret else None
        return UnitContact(
            webhook_url=str(unit.webhook_url) if unit.webhook_url else None, webhook_secret=secret
        )
