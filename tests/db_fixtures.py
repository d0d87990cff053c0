"""Helpers for store tests: a fresh database per test, on SQLite or on PostgreSQL.

Test modules declare their own `database_url` fixture, parametrized over both backends,
with `fresh_database_url`, and get migrated sessions from `migrated_sessions`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core import db, registry
from core.registry_schemas import Unit, UnitKind
from tests.servers import PostgresServer

BACKENDS = ["sqlite", "postgresql"]


def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path, prefix: str) -> str:
    """A new, empty database for one test: `request.param` says which backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / f'{prefix}.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    return server.url(name)


@contextlib.asynccontextmanager
async def migrated_sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on the database after `db.upgrade`, the engine disposed at the end."""
    engine = db.create_engine(database_url)
    try:
        await db.upgrade(engine)
        yield db.session_factory(engine)
    finally:
        await engine.dispose()


# Units most tests need: a water company, a drainage company, a township.
WATER = Unit(code="WATER", name="Water supply company", kind=UnitKind.WATER_SUPPLY)
DRAINAGE = Unit(code="DRAIN", name="Drainage company", kind=UnitKind.DRAINAGE)
TOWNSHIP = Unit(code="TOWN-1", name="Xigong township", kind=UnitKind.TOWNSHIP)


async def add_units(sessions: async_sessionmaker[AsyncSession], *units: Unit) -> None:
    async with db.transaction(sessions) as session:
        for unit in units or (WATER, DRAINAGE, TOWNSHIP):
            await registry.create_unit(session=session, unit=unit)
