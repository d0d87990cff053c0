"""Migrations build exactly the tables the models declare, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

import alerting.models  # noqa: F401 -- puts the alerting tables on Base.metadata
import api.models  # noqa: F401 -- and the API keys
import core.held_readings  # and the held pushes' table
import core.registry_models  # noqa: F401 -- and the registry's
from core.db import Base, create_engine, current_revision, downgrade, head_revision, upgrade
from tests.db_fixtures import BACKENDS, fresh_database_url

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=BACKENDS)
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "migrations")


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> list[str]:
    return sorted(inspect(connection).get_table_names())


async def test_upgrade_matches_the_models_and_downgrade_removes_everything(
    empty_database: str,
) -> None:
    engine = create_engine(empty_database)
    try:
        await upgrade(engine)
        assert await current_revision(engine) == head_revision()
        async with engine.connect() as connection:
            assert await connection.run_sync(_differences) == []
        await upgrade(engine)  # a second run is a no-op
        await downgrade(engine, "base")
        async with engine.connect() as connection:
            assert await connection.run_sync(_tables) == ["alembic_version"]
    finally:
        await engine.dispose()
