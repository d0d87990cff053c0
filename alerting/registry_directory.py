"""The registry as the alerting sees it: covers and rules from the cache, units' contacts."""

from __future__ import annotations

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
from core.unregistered import UnregisteredLog

logger = logging.getLogger(__name__)


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

    def __init__(
        self, cache: RegistryCache, defaults: Thresholds, unregistered: UnregisteredLog
    ) -> None:
        self._cache = cache
        self._defaults = defaults
        self._unregistered = unregistered
        self._version = -2
        self._by_device: dict[str, CoverContext | None] = {}
        self._by_cover: dict[str, CoverContext] = {}

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

    def is_registered(self, device_id: str) -> bool:
        return self._cache.lookup(device_id) is not None

    async def refresh_for_unknown(self, received_ms: int) -> None:
        await self._cache.refresh_for_unknown(received_ms)

    def note_unregistered(self, device_id: str, received_ms: int) -> None:
        self._unregistered.seen(device_id, received_ms)


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
