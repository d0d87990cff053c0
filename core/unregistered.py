"""Devices heard on the wire but absent from the registry, listed for commissioning.

The hot path only counts in memory (`seen`); a flusher writes the counts every few
seconds as one upsert per device (first seen, last seen, readings), so a device that
floods the broker costs one row write per flush, not one per reading. Registering the
device deletes its row (`core.registry.create_device`), and a count still in memory for a
device registered meanwhile is dropped at the next flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel
from sqlalchemy import Insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db import transaction
from core.registry_models import UnregisteredDeviceRow

logger = logging.getLogger(__name__)

# How often the counts are written.
FLUSH_S = 2.0
# Distinct unknown devices counted between two flushes. A misconfigured fleet (or an
# attacker) cycling through ids would otherwise grow memory without bound; beyond this,
# readings are still stored, only the listing misses them until the next flush.
MAX_PENDING = 10_000
# Device ids remembered as listed already, so each is logged once per process.
_MAX_LOGGED = 100_000
# Back-off while the database is away.
_RETRY_S = 5.0


class UnregisteredDevice(BaseModel):
    """A device that published but is not in the registry."""

    device_id: str
    first_seen_at: datetime
    last_seen_at: datetime
    readings: int


@dataclass(slots=True)
class _Seen:
    first_ms: int
    last_ms: int
    readings: int


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class UnregisteredLog:
    """Counts readings of unregistered devices and writes the counts periodically."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        is_registered: Callable[[str], bool],
    ) -> None:
        self._sessions = sessions
        self._is_registered = is_registered
        self._pending: dict[str, _Seen] = {}
        self._logged: set[str] = set()
        self.overflowed = 0  # readings not counted because MAX_PENDING was reached

    def seen(self, device_id: str, at_ms: int) -> None:
        """Counts one reading of an unregistered device (hot path: memory only)."""
        found = self._pending.get(device_id)
        if found is not None:
            found.readings += 1
            found.last_ms = max(found.last_ms, at_ms)
            return
        if len(self._pending) >= MAX_PENDING:
            self.overflowed += 1
            return
        self._pending[device_id] = _Seen(at_ms, at_ms, 1)
        if device_id not in self._logged and len(self._logged) < _MAX_LOGGED:
            self._logged.add(device_id)
            logger.warning(
                "unregistered_device %s: readings stored, not evaluated until it is registered",
                device_id,
            )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Writes the counts so far; returns how many devices were written."""
        pending, self._pending = self._pending, {}
        rows = [
            {
                "device_id": device_id,
                "first_seen_at": _at(seen.first_ms),
                "last_seen_at": _at(seen.last_ms),
                "readings": seen.readings,
            }
            for device_id, seen in pending.items()
            if not self._is_registered(device_id)  # registered meanwhile: not news any more
        ]
        if not rows:
            return 0
        try:
            async with transaction(self._sessions) as session:
                dialect = (await session.connection()).dialect.name
                await session.execute(_upsert(dialect), rows)
        except BaseException:
            self._merge_back(pending)
            raise
        return len(rows)

    def _merge_back(self, pending: dict[str, _Seen]) -> None:
        for device_id, seen in pending.items():
            newer = self._pending.get(device_id)
            if newer is not None:
                seen.readings += newer.readings
                seen.last_ms = max(seen.last_ms, newer.last_ms)
            self._pending[device_id] = seen

    async def run(self) -> None:
        """Flushes every FLUSH_S until cancelled; a database outage only delays."""
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                await self.flush()
            except Exception:  # the database is away: the counts wait in memory
                logger.exception("could not record unregistered devices; retrying")
                await asyncio.sleep(_RETRY_S)


def _upsert(dialect: str) -> Insert:
    """Insert, or add the readings and move `last_seen_at` of a row that exists."""
    row = UnregisteredDeviceRow
    statement: postgresql.Insert | sqlite.Insert = (
        postgresql.insert(row) if dialect == "postgresql" else sqlite.insert(row)
    )
    return statement.on_conflict_do_update(
        index_elements=["device_id"],
        set_={
            "last_seen_at": statement.excluded.last_seen_at,
            "readings": row.readings + statement.excluded.readings,
        },
    )


async def list_unregistered(
    *, session: AsyncSession, limit: int, offset: int = 0
) -> list[UnregisteredDevice]:
    """Unregistered devices, the most recently heard first."""
    query = (
        select(UnregisteredDeviceRow)
        .order_by(
            UnregisteredDeviceRow.last_seen_at.desc().nulls_last(),
            UnregisteredDeviceRow.device_id,
        )
        .limit(limit)
        .offset(offset)
    )
    return [
        UnregisteredDevice(
            device_id=row.device_id,
            first_seen_at=row.first_seen_at,
            last_seen_at=row.last_seen_at or row.first_seen_at,
            readings=row.readings,
        )
        for row in await session.scalars(query)
    ]
