"""Registry tables: units, roads, covers, devices, device bindings, and the change counter."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UtcDateTime, utcnow
from core.registry_schemas import CoverState, EndReason, UnitKind


def _one_of(column: str, values: list[str]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class UnitRow(Base):
    """An owner or maintainer: a utility, a public unit, or a township government."""

    __tablename__ = "units"
    __table_args__ = (CheckConstraint(_one_of("kind", [k.value for k in UnitKind]), name="kind"),)

    code: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    parent: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    # Kept as given: it is the HMAC key the notifier signs deliveries with (DESIGN §11).
    webhook_secret: Mapped[str | None] = mapped_column(String(200))
    supervisor_contact: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class RoadRow(Base):
    """A road's record (一路一档案): the covers on it, and its township."""

    __tablename__ = "roads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    township_unit: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class CoverRow(Base):
    """One cover (一盖一编号, 一井一权属), keyed by its 16-digit standard number."""

    __tablename__ = "covers"
    __table_args__ = (
        CheckConstraint(_one_of("state", [s.value for s in CoverState]), name="state"),
        CheckConstraint("lon >= -180 AND lon <= 180 AND lat >= -90 AND lat <= 90", name="wgs84"),
    )

    cover_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    kind_code: Mapped[str] = mapped_column(String(4))
    owner_unit: Mapped[str] = mapped_column(ForeignKey("units.code"), index=True)
    maintainer_unit: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    road_id: Mapped[int] = mapped_column(ForeignKey("roads.id"), index=True)
    grid: Mapped[str | None] = mapped_column(String(100))
    lon: Mapped[float] = mapped_column(Float)
    lat: Mapped[float] = mapped_column(Float)
    depth_cm: Mapped[float | None] = mapped_column(Float)
    material: Mapped[str | None] = mapped_column(String(100))
    installed_on: Mapped[date | None] = mapped_column(Date)
    flood_prone: Mapped[bool] = mapped_column(Boolean, default=False)
    anti_fall: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default=CoverState.IN_SERVICE.value)
    # ThresholdOverrides as JSON; null when the cover uses the defaults.
    thresholds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class DeviceRow(Base):
    """A sensor, known by the device id it publishes under."""

    __tablename__ = "devices"
    # A platform's id names one device; devices without one (nulls) are not compared.
    __table_args__ = (UniqueConstraint("source", "external_id"),)

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(100))
    # The ingress source it reports through (SMARTCOVER_SOURCES_FILE) and its id there:
    # IMEI, devEUI, the platform's device id (DESIGN §12).
    source: Mapped[str | None] = mapped_column(String(64))
    external_id: Mapped[str | None] = mapped_column(String(128))
    # Online or offline as its platform last said, and when (null: never said).
    online: Mapped[bool | None] = mapped_column(Boolean)
    status_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    report_interval_s: Mapped[int] = mapped_column(Integer)
    # Only a salted hash of the device's MQTT password (see core.registry.hash_secret).
    credential_hash: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class DeviceBindingRow(Base):
    """A period during which a device was mounted on a cover; open while unbound_at is null.

    Rows are never deleted: a sensor replaced after theft leaves its period behind, so the
    readings it sent can still be put on the right cover.
    """

    __tablename__ = "device_bindings"
    __table_args__ = (
        CheckConstraint(_one_of("end_reason", [r.value for r in EndReason]), name="end_reason"),
        # One open binding per device and one per cover.
        Index(
            "ux_device_bindings_open_device",
            "device_id",
            unique=True,
            sqlite_where=text("unbound_at IS NULL"),
            postgresql_where=text("unbound_at IS NULL"),
        ),
        Index(
            "ux_device_bindings_open_cover",
            "cover_id",
            unique=True,
            sqlite_where=text("unbound_at IS NULL"),
            postgresql_where=text("unbound_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"), index=True)
    cover_id: Mapped[str] = mapped_column(ForeignKey("covers.cover_id"), index=True)
    bound_at: Mapped[datetime] = mapped_column(UtcDateTime)
    unbound_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    end_reason: Mapped[str | None] = mapped_column(String(16))


class RegistryVersionRow(Base):
    """A single row counting registry changes: caches reload when it moves."""

    __tablename__ = "registry_version"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class UnregisteredDeviceRow(Base):
    """A device id seen on the wire but absent from the registry, recorded once."""

    __tablename__ = "unregistered_devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    readings: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
