"""Alembic environment: migrates on the caller's connection, or on `sqlalchemy.url`'s.

`core.db.upgrade()` passes its connection in `config.attributes["connection"]`. Run
standalone (`alembic -c core/migrations/alembic.ini revision --autogenerate -m …`), it
opens the database of `sqlalchemy.url`, or else of SMARTCOVER_DATABASE_URL.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

# Every module defining tables on Base is imported here, so autogenerate sees them all.
import alerting.models  # noqa: F401 -- registers the tables
import api.models  # noqa: F401
import core.held_readings  # the held pushes' table (`core` is bound: no F401 here)
import core.registry_models  # noqa: F401
from core.db import Base, create_engine


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _standalone_url() -> str:
    url = context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from core.settings import Settings  # noqa: PLC0415 -- only when run by the alembic CLI

    return Settings().database_url


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("offline (--sql) migrations are not supported")
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
    else:
        asyncio.run(_run_standalone(_standalone_url()))


main()
