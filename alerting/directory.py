"""A cover directory held in plain dicts: for tests, the simulator and small deployments."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from alerting.engine import CoverContext

logger = logging.getLogger(__name__)


class StaticDirectory:
    """Devices bound to covers, given up front; unregistered devices are noted once."""

    def __init__(
        self, bindings: Iterable[tuple[str, CoverContext]], webhook_units: Iterable[str] = ()
    ) -> None:
        self._by_device = dict(bindings)
        self._by_cover = {context.info.cover_id: context for context in self._by_device.values()}
        self._webhook_units = frozenset(webhook_units)
        self.unregistered: set[str] = set()

    def cover_of(self, device_id: str) -> CoverContext | None:
        return self._by_device.get(device_id)

    def cover(self, cover_id: str) -> CoverContext | None:
        return self._by_cover.get(cover_id)

    def webhook_units(self) -> frozenset[str]:
        return self._webhook_units

    def is_registered(self, device_id: str) -> bool:
        return device_id in self._by_device

    async def refresh_for_unknown(self, received_ms: int) -> None:
        """Nothing to refresh: the bindings were given up front."""

    def note_unregistered(self, device_id: str, received_ms: int) -> None:
        if device_id not in self.unregistered:
            self.unregistered.add(device_id)
            logger.warning("readings from unregistered device %s: stored, not evaluated", device_id)
