"""Tables of the API domain: the API keys, stored as hashes only."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UtcDateTime, utcnow


class Role(StrEnum):
    """What a key may do; each role can do everything the ones before it can."""

    VIEWER = "viewer"
    CREW = "crew"
    DISPATCHER = "dispatcher"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)


class ApiKeyRow(Base):
    """One API key: its holder, role, and for a crew the unit it works for."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("role IN ('viewer', 'crew', 'dispatcher', 'admin')", name="role"),
        # A crew key works for exactly one unit; the other roles see every unit.
        CheckConstraint(
            "(role = 'crew' AND unit_code IS NOT NULL) OR (role <> 'crew' AND unit_code IS NULL)",
            name="crew_unit",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))  # the holder, recorded as the actor
    role: Mapped[str] = mapped_column(String(16))
    unit_code: Mapped[str | None] = mapped_column(ForeignKey("units.code"), index=True)
    # Hex SHA-256 of the whole key (see api.keys for why a fast hash is enough).
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, to tell keys apart in listings; never enough to use.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
