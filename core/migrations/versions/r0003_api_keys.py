"""API keys: holder, role, a crew's unit, the key's SHA-256 and a display prefix."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("unit_code", sa.String(64), nullable=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "role IN ('viewer', 'crew', 'dispatcher', 'admin')", name=op.f("ck_api_keys_role")
        ),
        sa.CheckConstraint(
            "(role = 'crew' AND unit_code IS NOT NULL) OR (role <> 'crew' AND unit_code IS NULL)",
            name=op.f("ck_api_keys_crew_unit"),
        ),
        sa.ForeignKeyConstraint(
            ["unit_code"], ["units.code"], name=op.f("fk_api_keys_unit_code_units")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index(op.f("ix_api_keys_unit_code"), "api_keys", ["unit_code"])


def downgrade() -> None:
    op.drop_index(op.f("ix_api_keys_unit_code"), table_name="api_keys")
    op.drop_table("api_keys")
