"""Readings pushed for an external id no device has yet: held, listed for commissioning,
and replayed once a device is registered with that source and id (DESIGN §12)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from core.contract import STALE_LIMIT_MS
from core.db import Base, UtcDateTime
from core.registry_models import DeviceRow

# Held no longer than the contract accepts a reading's age (7 days, core.contract): an
# older one would be refused at replay as stale_ts, and a sensor nobody registers for
# months must not fill the database.
KEEP = timedelta(milliseconds=STALE_LIMIT_MS)


class HeldReadingRow(Base):
    __tablename__ = "held_readings"
    __table_args__ = (Index("ix_held_readings_source_external_id", "source", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    external_id: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The codec's input as the platform gave it (a frame's bytes, or JSON text), and what
    # the envelope supplied: decoded again, with the device's model, at replay.
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    is_json: Mapped[bool]
    seq: Mapped[int | None] = mapped_column(BigInteger)
    ts_ms: Mapped[int | None] = mapped_column(BigInteger)


@dataclass(frozen=True, slots=True)
class UnknownExternalId:
    source: str
    external_id: str
    readings: int
    first_at: datetime
    last_at: datetime


async def hold(*, session: AsyncSession, rows: Sequence[HeldReadingRow], now: datetime) -> None:
    await session.execute(delete(HeldReadingRow).where(HeldReadingRow.received_at < now - KEEP))
    session.add_all(rows)
    await session.flush()


async def list_unknown(*, session: AsyncSession) -> list[UnknownExternalId]:
    """External ids with held readings, by source and id: the devices to commission."""
    query = (
        select(
            HeldReadingRow.source,
            HeldReadingRow.external_id,
            func.count(),
            func.min(HeldReadingRow.received_at),
            func.max(HeldReadingRow.received_at),
        )
        .group_by(HeldReadingRow.source, HeldReadingRow.external_id)
        .order_by(HeldReadingRow.source, HeldReadingRow.external_id)
    )
    return [UnknownExternalId(*row) for row in await session.execute(query)]


async def registered(
    *, session: AsyncSession, source: str, limit: int
) -> list[tuple[HeldReadingRow, str, str | None]]:
    """Held readings of `source` whose external id a device now has: (row, device, model),
    oldest first."""
    query = (
        select(HeldReadingRow, DeviceRow.device_id, DeviceRow.model)
        .join(
            DeviceRow,
            (DeviceRow.source == HeldReadingRow.source)
            & (DeviceRow.external_id == HeldReadingRow.external_id),
        )
        .where(HeldReadingRow.source == source)
        .order_by(HeldReadingRow.id)
        .limit(limit)
    )
    return [(row, device_id, model) for row, device_id, model in await session.execute(query)]


async def forget(*, session: AsyncSession, ids: Sequence[int]) -> None:
    await session.execute(delete(HeldReadingRow).where(HeldReadingRow.id.in_(ids)))
