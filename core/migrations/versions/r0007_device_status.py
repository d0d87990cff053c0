"""Devices' online/offline state as their platform last reported it (DESIGN §12)."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as table:
        table.add_column(sa.Column("online", sa.Boolean(), nullable=True))
        table.add_column(sa.Column("status_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as table:
        table.drop_column("status_at")
        table.drop_column("online")
