"""Alerting: rule state, device progress, alerts, incidents, cases, timeline, outbox."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen history: types spelled out here, not imported from the models.
_ACTIVE = sa.text("status = 'active'")
_OPEN_CASE = sa.text("status NOT IN ('closed', 'cancelled')")


def _ms(name: str, *, nullable: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "alert_states",
        sa.Column("cover_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        _ms("updated_ms"),
        sa.PrimaryKeyConstraint("cover_id", "kind", name="pk_alert_states"),
    )
    op.create_table(
        "device_progress",
        sa.Column("device_id", sa.String(64), nullable=False),
        _ms("last_ts_ms"),
        _ms("last_seen_ms"),
        sa.PrimaryKeyConstraint("device_id", name="pk_device_progress"),
    )
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("road", sa.String(128), nullable=False),
        _ms("opened_ms"),
        _ms("last_ms"),
        _ms("closed_ms", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_incidents"),
    )
    _create_cases()
    _create_alerts()
    _create_outbox()


def _create_cases() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cover_id", sa.String(32), nullable=False),
        sa.Column("unit_code", sa.String(32), nullable=False),
        sa.Column("road", sa.String(128), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("kinds", sa.JSON(), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=True),
        _ms("opened_ms"),
        sa.Column("state_times", sa.JSON(), nullable=False),
        sa.Column("deadlines", sa.JSON(), nullable=False),
        sa.Column("escalated", sa.JSON(), nullable=False),
        sa.Column("overdue", sa.Boolean(), nullable=False),
        _ms("last_notified_ms"),
        _ms("verify_since_ms", nullable=True),
        sa.Column("verify_readings", sa.Integer(), nullable=False),
        sa.Column("cancel_reason", sa.Text(), nullable=True),
        sa.Column("reopened", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["incident_id"], ["incidents.id"], name="fk_cases_incident_id_incidents"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
    )
    for column in ("cover_id", "unit_code", "status", "incident_id", "overdue"):
        op.create_index(f"ix_cases_{column}", "cases", [column])
    op.create_index(
        "uq_cases_open_cover",
        "cases",
        ["cover_id"],
        unique=True,
        sqlite_where=_OPEN_CASE,
        postgresql_where=_OPEN_CASE,
    )
    op.create_table(
        "case_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("case_id", sa.Integer(), nullable=False),
        _ms("at_ms"),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_case_events_case_id_cases"),
        sa.PrimaryKeyConstraint("id", name="pk_case_events"),
    )
    op.create_index("ix_case_events_case_id", "case_events", ["case_id"])


def _create_alerts() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cover_id", sa.String(32), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(32), nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        _ms("raised_ms"),
        _ms("cleared_ms", nullable=True),
        _ms("received_ms", nullable=True),
        _ms("committed_ms", nullable=True),
        _ms("notified_ms", nullable=True),
        sa.Column("case_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_alerts_case_id_cases"),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_cover_id", "alerts", ["cover_id"])
    op.create_index("ix_alerts_case_id", "alerts", ["case_id"])
    op.create_index(
        "uq_alerts_active",
        "alerts",
        ["cover_id", "kind"],
        unique=True,
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )


def _create_outbox() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("unit_code", sa.String(32), nullable=False),
        _ms("occurred_ms"),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index("ix_outbox_unit_code", "outbox", ["unit_code"])
    op.create_table(
        "outbox_deliveries",
        sa.Column("outbox_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ms("next_attempt_ms"),
        _ms("delivered_ms", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["outbox_id"], ["outbox.id"], name="fk_outbox_deliveries_outbox_id_outbox"
        ),
        sa.PrimaryKeyConstraint("outbox_id", "channel", name="pk_outbox_deliveries"),
    )
    op.create_index(
        "ix_outbox_deliveries_due", "outbox_deliveries", ["delivered_ms", "next_attempt_ms"]
    )


def downgrade() -> None:
    for table in (
        "outbox_deliveries",
        "outbox",
        "alerts",
        "case_events",
        "cases",
        "incidents",
        "device_progress",
        "alert_states",
    ):
        op.drop_table(table)
