"""Unregistered devices: when last heard of and how many readings, for commissioning."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("unregistered_devices") as table:
        table.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("readings", sa.BigInteger(), nullable=False, server_default="0"))
    op.execute("UPDATE unregistered_devices SET last_seen_at = first_seen_at")


def downgrade() -> None:
    with op.batch_alter_table("unregistered_devices") as table:
        table.drop_column("readings")
        table.drop_column("last_seen_at")
