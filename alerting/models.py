"""Tables of the alerting domain: rule state, alerts, cases and their timeline, the outbox."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base

# Partial unique indexes need the same predicate on SQLite and PostgreSQL.
_ACTIVE = text("status = 'active'")
_OPEN_CASE = text("status NOT IN ('closed', 'cancelled')")


class CaseStatus(StrEnum):
    """DESIGN §6; in brackets the urban-management case flow (CJ/T 315)."""

    OPEN = "open"  # 立案
    DISPATCHED = "dispatched"  # 派遣
    ACKNOWLEDGED = "acknowledged"  # 处置
    ON_SITE = "on_site"  # 处置
    RESOLVED = "resolved"  # 处置反馈
    VERIFIED = "verified"  # 核查
    CLOSED = "closed"  # 结案
    CANCELLED = "cancelled"  # false alarm, with a reason


class AlertStatus(StrEnum):
    ACTIVE = "active"
    CLEARED = "cleared"


class AlertStateRow(Base):
    """The rule state of one (cover, kind) that is not at rest (see alerting.rules.KindState)."""

    __tablename__ = "alert_states"

    cover_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class DeviceProgress(Base):
    """Per device: the newest reading evaluated (ordering) and when we last heard of it."""

    __tablename__ = "device_progress"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_ts_ms: Mapped[int] = mapped_column(BigInteger)
    last_seen_ms: Mapped[int] = mapped_column(BigInteger)  # receive time, server clock


class AlertRow(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        # One active alert per (cover, kind), enforced by the database.
        Index(
            "uq_alerts_active",
            "cover_id",
            "kind",
            unique=True,
            sqlite_where=_ACTIVE,
            postgresql_where=_ACTIVE,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cover_id: Mapped[str] = mapped_column(String(32), index=True)
    device_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str | None] = mapped_column(String(32))  # the flapping kind
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=AlertStatus.ACTIVE)
    value: Mapped[float | None] = mapped_column(Float)
    raised_ms: Mapped[int] = mapped_column(BigInteger)  # device time of the raising reading
    cleared_ms: Mapped[int | None] = mapped_column(BigInteger)
    received_ms: Mapped[int | None] = mapped_column(BigInteger)  # latency figures, server clock
    committed_ms: Mapped[int | None] = mapped_column(BigInteger)
    notified_ms: Mapped[int | None] = mapped_column(BigInteger)
    case_id: Mapped[int | None] = mapped_column(ForeignKey("cases.id"), index=True)


class IncidentRow(Base):
    """Many cases of one cause in one area, e.g. a storm flooding a road."""

    __tablename__ = "incidents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    road: Mapped[str] = mapped_column(String(128))
    opened_ms: Mapped[int] = mapped_column(BigInteger)
    last_ms: Mapped[int] = mapped_column(BigInteger)
    closed_ms: Mapped[int | None] = mapped_column(BigInteger)


class CaseRow(Base):
    __tablename__ = "cases"
    __table_args__ = (
        # At most one open case per cover, enforced by the database.
        Index(
            "uq_cases_open_cover",
            "cover_id",
            unique=True,
            sqlite_where=_OPEN_CASE,
            postgresql_where=_OPEN_CASE,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cover_id: Mapped[str] = mapped_column(String(32), index=True)
    unit_code: Mapped[str] = mapped_column(String(32), index=True)
    road: Mapped[str | None] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    kinds: Mapped[list[str]] = mapped_column(JSON)  # alert kinds attached
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id"), index=True)
    opened_ms: Mapped[int] = mapped_column(BigInteger)
    # One timestamp per state reached (the newest time it was reached).
    state_times: Mapped[dict[str, int]] = mapped_column(JSON)
    # Deadlines by milestone ("acknowledged", "on_site", "resolved"), epoch ms.
    deadlines: Mapped[dict[str, int]] = mapped_column(JSON)
    escalated: Mapped[list[str]] = mapped_column(JSON)  # milestones already escalated
    overdue: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    last_notified_ms: Mapped[int] = mapped_column(BigInteger)  # for re-notification
    verify_since_ms: Mapped[int | None] = mapped_column(BigInteger)
    verify_readings: Mapped[int] = mapped_column(Integer, default=0)
    cancel_reason: Mapped[str | None] = mapped_column(Text)
    reopened: Mapped[int] = mapped_column(Integer, default=0)


class CaseEventRow(Base):
    """The case timeline: every change, with actor, time and note."""

    __tablename__ = "case_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id"), index=True)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))  # transition, attach, escalate, renotify…
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(Text, default="")


class OutboxRow(Base):
    """An event to deliver, written in the same transaction as the change it reports."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)  # idempotency key
    type: Mapped[str] = mapped_column(String(32))  # alert.raised, case.opened, …
    unit_code: Mapped[str] = mapped_column(String(32), index=True)
    occurred_ms: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class DeliveryRow(Base):
    """One outbox event on one channel (mqtt, webhook): delivered, or when to try again."""

    __tablename__ = "outbox_deliveries"
    __table_args__ = (Index("ix_outbox_deliveries_due", "delivered_ms", "next_attempt_ms"),)

    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger)
    delivered_ms: Mapped[int | None] = mapped_column(BigInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
