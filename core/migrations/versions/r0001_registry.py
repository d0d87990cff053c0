"""Registry: units, roads, covers, devices, device bindings, change counter, unregistered."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

# Revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Migrations are frozen history: they spell out their types and values instead of
# importing the models, which will change after them.
_UNIT_KINDS = (
    "water_supply",
    "drainage",
    "gas",
    "heating",
    "power",
    "telecom",
    "public_security",
    "traffic",
    "broadcast_tv",
    "township",
    "other",
)
_OPEN = sa.text("unbound_at IS NULL")


def _one_of(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


def _timestamps() -> list[sa.Column[datetime]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "units",
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("webhook_url", sa.String(2000), nullable=True),
        sa.Column("webhook_secret", sa.String(200), nullable=True),
        sa.Column("supervisor_contact", sa.String(200), nullable=True),
        *_timestamps(),
        sa.CheckConstraint(_one_of("kind", _UNIT_KINDS), name=op.f("ck_units_kind")),
        sa.ForeignKeyConstraint(["parent"], ["units.code"], name=op.f("fk_units_parent_units")),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_units")),
    )
    op.create_index(op.f("ix_units_parent"), "units", ["parent"])

    op.create_table(
        "roads",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("township_unit", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["township_unit"], ["units.code"], name=op.f("fk_roads_township_unit_units")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_roads")),
        sa.UniqueConstraint("name", name=op.f("uq_roads_name")),
    )
    op.create_index(op.f("ix_roads_township_unit"), "roads", ["township_unit"])

    op.create_table(
        "covers",
        sa.Column("cover_id", sa.String(16), nullable=False),
        sa.Column("kind_code", sa.String(4), nullable=False),
        sa.Column("owner_unit", sa.String(64), nullable=False),
        sa.Column("maintainer_unit", sa.String(64), nullable=True),
        sa.Column("road_id", sa.Integer(), nullable=False),
        sa.Column("grid", sa.String(100), nullable=True),
        sa.Column("lon", sa.Float(), nullable=False),
        sa.Column("lat", sa.Float(), nullable=False),
        sa.Column("depth_cm", sa.Float(), nullable=True),
        sa.Column("material", sa.String(100), nullable=True),
        sa.Column("installed_on", sa.Date(), nullable=True),
        sa.Column("flood_prone", sa.Boolean(), nullable=False),
        sa.Column("anti_fall", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        *_timestamps(),
        sa.CheckConstraint(
            _one_of("state", ("in_service", "abandoned", "filled")), name=op.f("ck_covers_state")
        ),
        sa.CheckConstraint(
            "lon >= -180 AND lon <= 180 AND lat >= -90 AND lat <= 90",
            name=op.f("ck_covers_wgs84"),
        ),
        sa.ForeignKeyConstraint(
            ["maintainer_unit"], ["units.code"], name=op.f("fk_covers_maintainer_unit_units")
        ),
        sa.ForeignKeyConstraint(
            ["owner_unit"], ["units.code"], name=op.f("fk_covers_owner_unit_units")
        ),
        sa.ForeignKeyConstraint(["road_id"], ["roads.id"], name=op.f("fk_covers_road_id_roads")),
        sa.PrimaryKeyConstraint("cover_id", name=op.f("pk_covers")),
    )
    op.create_index(op.f("ix_covers_maintainer_unit"), "covers", ["maintainer_unit"])
    op.create_index(op.f("ix_covers_owner_unit"), "covers", ["owner_unit"])
    op.create_index(op.f("ix_covers_road_id"), "covers", ["road_id"])

    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("model", sa.String(100), nullable=True),
        sa.Column("report_interval_s", sa.Integer(), nullable=False),
        sa.Column("credential_hash", sa.String(200), nullable=True),
        *_timestamps(),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )

    op.create_table(
        "device_bindings",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("cover_id", sa.String(16), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unbound_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.CheckConstraint(
            _one_of("end_reason", ("replaced", "moved", "unbound")),
            name=op.f("ck_device_bindings_end_reason"),
        ),
        sa.ForeignKeyConstraint(
            ["cover_id"], ["covers.cover_id"], name=op.f("fk_device_bindings_cover_id_covers")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.device_id"],
            name=op.f("fk_device_bindings_device_id_devices"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_bindings")),
    )
    op.create_index(op.f("ix_device_bindings_cover_id"), "device_bindings", ["cover_id"])
    op.create_index(op.f("ix_device_bindings_device_id"), "device_bindings", ["device_id"])
    for column in ("cover", "device"):
        op.create_index(
            f"ux_device_bindings_open_{column}",
            "device_bindings",
            [f"{column}_id"],
            unique=True,
            sqlite_where=_OPEN,
            postgresql_where=_OPEN,
        )

    registry_version = op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_registry_version_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_version")),
    )
    op.bulk_insert(registry_version, [{"id": 1, "version": 0, "changed_at": datetime.now(UTC)}])

    op.create_table(
        "unregistered_devices",
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_unregistered_devices")),
    )


def downgrade() -> None:
    for table in (
        "unregistered_devices",
        "registry_version",
        "device_bindings",
        "devices",
        "covers",
        "roads",
        "units",
    ):
        op.drop_table(table)
