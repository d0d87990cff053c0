"""Devices gain the source they report through and their id there (DESIGN §12)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as table:
        table.add_column(sa.Column("source", sa.String(64), nullable=True))
        table.add_column(sa.Column("external_id", sa.String(128), nullable=True))
        # One device per id on a platform; devices without one (nulls) are not compared.
        table.create_unique_constraint(
            op.f("uq_devices_source_external_id"), ["source", "external_id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("devices") as table:
        table.drop_constraint(op.f("uq_devices_source_external_id"), type_="unique")
        table.drop_column("external_id")
        table.drop_column("source")
