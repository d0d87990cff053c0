"""API keys: creation (the only time a key exists in clear), listing, revocation, look-up.

A key is `sck_` and 256 random bits (43 URL-safe characters). Only its SHA-256 is stored.
Why not a slow KDF (bcrypt, scrypt, Argon2)? Stretching protects secrets that people
choose, whose guessing space is small; a 256-bit random key cannot be guessed whatever
the hash, so stretching would only cost time on every request. A fast unsalted hash also
lets the key be found with one indexed look-up instead of a scan of salted hashes. The
bootstrap `SMARTCOVER_ADMIN_KEY` is compared as a hash too, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Collection
from datetime import datetime

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import NotFoundError, Unprocessable
from api.models import ApiKeyRow, Role
from core.db import utcnow
from core.registry_models import UnitRow

logger = logging.getLogger(__name__)

KEY_PREFIX = "sck_"
_KEY_BYTES = 32  # 256 bits
_SHOWN_CHARS = 8  # of the key in listings: the prefix and 4 random characters
_MAX_NAME = 100
BOOTSTRAP_NAME = "bootstrap admin"
# Actors the case desk writes itself; a key holder must not be mistaken for them.
_RESERVED = ("system",)


class ApiKey(BaseModel):
    """A key as listed and as the API sees its caller (never the key itself)."""

    model_config = ConfigDict(frozen=True)

    id: int  # 0 for the bootstrap admin key, which lives in the settings
    name: str
    role: Role
    unit_code: str | None
    prefix: str
    created_at: datetime | None
    revoked_at: datetime | None = None

    def at_least(self, role: Role) -> bool:
        return self.role.rank >= role.rank


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        unit_code=row.unit_code,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > _MAX_NAME:
        raise Unprocessable(f"the holder's name must be 1-{_MAX_NAME} characters")
    if name.lower().startswith(_RESERVED):
        raise Unprocessable(f"{name!r} is reserved for the service's own actors")
    return name


async def create_key(
    *, session: AsyncSession, role: Role, name: str, unit_code: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for `name`; returns its record and the key, which is not kept anywhere."""
    name = _check_name(name)
    if role is Role.CREW and unit_code is None:
        raise Unprocessable("a crew key needs the unit it works for")
    if role is not Role.CREW and unit_code is not None:
        raise Unprocessable(f"only crew keys are bound to a unit, not {role.value} keys")
    if unit_code is not None and await session.get(UnitRow, unit_code) is None:
        raise Unprocessable(f"unit {unit_code!r} does not exist")
    key = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
    row = ApiKeyRow(
        name=name,
        role=role.value,
        unit_code=unit_code,
        key_hash=key_hash(key),
        prefix=key[:_SHOWN_CHARS],
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    logger.info("API key %d created: %s, %s %s", row.id, row.prefix, role.value, unit_code or "")
    return _key(row), key


async def list_keys(*, session: AsyncSession, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKeyRow).order_by(ApiKeyRow.id)
    if not include_revoked:
        query = query.where(ApiKeyRow.revoked_at.is_(None))
    return [_key(row) for row in await session.scalars(query)]


async def revoke_key(*, session: AsyncSession, key_id: int) -> ApiKey:
    """Revokes a key from now on; revoking it again changes nothing."""
    row = await session.get(ApiKeyRow, key_id)
    if row is None:
        raise NotFoundError(f"API key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        await session.flush()
        logger.info("API key %d revoked: %s", row.id, row.prefix)
    return _key(row)


async def valid_key_ids(*, session: AsyncSession, key_ids: Collection[int]) -> set[int]:
    """Which of `key_ids` still open the API: not revoked and not deleted. The bootstrap
    admin (id 0) lives in the settings and is valid for as long as the process runs."""
    stored = {key_id for key_id in key_ids if key_id != 0}
    valid = {0} & set(key_ids)
    if stored:
        query = select(ApiKeyRow.id).where(ApiKeyRow.id.in_(stored), ApiKeyRow.revoked_at.is_(None))
        valid.update(await session.scalars(query))
    return valid


def bootstrap_admin(key: str, admin_key: str) -> ApiKey | None:
    """The settings' admin key as a caller, when `key` is it (and one is configured)."""
    if not admin_key:
        return None
    # Comparing digests keeps the comparison constant-time whatever the lengths.
    if not hmac.compare_digest(key_hash(key), key_hash(admin_key)):
        return None
    return ApiKey(
        id=0, name=BOOTSTRAP_NAME, role=Role.ADMIN, unit_code=None, prefix="", created_at=None
    )


async def authenticate(*, session: AsyncSession, key: str, admin_key: str = "") -> ApiKey | None:
    """The caller a key belongs to, or None for an unknown or revoked key."""
    admin = bootstrap_admin(key, admin_key)
    if admin is not None:
        return admin
    if not key.startswith(KEY_PREFIX):
        return None  # saves the look-up for garbage
    row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash(key)))
    if row is None or row.revoked_at is not None:
        return None
    return _key(row)
