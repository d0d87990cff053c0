"""The relational store: async engine and sessions from `database_url`, the Base, migrations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, DateTime, Dialect, MetaData, TypeDecorator, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import StaticPool

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# How long a SQLite writer waits for the lock before "database is locked". SQLite has one
# writer at a time, and the longest write we make is a whole census import (≤ 30 s).
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option asking SQLite for the write lock when the transaction begins (see
# `transaction`); PostgreSQL ignores it.
_IMMEDIATE = "smartcover_sqlite_immediate"

# Stable constraint names: Alembic needs them to alter or drop constraints later, and
# SQLite's batch migrations rebuild tables by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """The declarative base of every table in the relational store, whatever its domain."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, always aware and in UTC when read, on SQLite as on PostgreSQL.

    SQLite has no time zones: it would hand back naive datetimes where PostgreSQL gives
    aware ones, and comparing the two raises.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: give a time zone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class DatabaseUrlError(ValueError):
    """`database_url` names a database this service cannot use."""


class DatabaseMissingError(FileNotFoundError):
    """A command that works on an existing database found no SQLite file where the URL
    points (SQLite would otherwise create an empty one there, and leave it behind)."""


def async_url(database_url: str) -> str:
    """`sqlite:///…` → `sqlite+aiosqlite:///…`, `postgresql://…` → `postgresql+asyncpg://…`.

    A URL that already names one of these async drivers is returned unchanged.
    """
    try:
        url = make_url(database_url)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"cannot parse database URL: {exc}") from None
    backend = url.get_backend_name()
    driver = {"sqlite": "aiosqlite", "postgresql": "asyncpg", "postgres": "asyncpg"}.get(backend)
    if driver is None:
        raise DatabaseUrlError(f"unsupported database {backend!r}: use sqlite:// or postgresql://")
    if url.drivername not in (backend, f"{backend}+{driver}"):
        raise DatabaseUrlError(f"unsupported driver {url.drivername!r}: leave the driver out")
    if backend == "postgres":  # Heroku-style alias, which SQLAlchemy no longer accepts
        backend = "postgresql"
    return url.set(drivername=f"{backend}+{driver}").render_as_string(hide_password=False)


def create_engine(
    database_url: str, *, echo: bool = False, must_exist: bool = False
) -> AsyncEngine:
    """An async engine; on SQLite: WAL, foreign keys enforced, a busy timeout, real BEGINs.

    `must_exist`: a SQLite file that is not there is refused (`DatabaseMissingError`)
    instead of created, for commands that only read or change an existing registry.
    """
    url = make_url(async_url(database_url))
    if must_exist:
        _require_sqlite_file(url)
    if url.get_backend_name() != "sqlite":
        # pool_pre_ping: a database restart must not hand out dead connections (DESIGN §8).
        return create_async_engine(url, echo=echo, pool_pre_ping=True)
    options: dict[str, Any] = {}
    if url.database in (None, "", ":memory:"):
        # Every connection to :memory: is a database of its own: share a single one.
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = create_async_engine(url, echo=echo, **options)
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
    return engine


def _require_sqlite_file(url: URL) -> None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    path = Path(url.database)
    if not path.is_file():
        raise DatabaseMissingError(
            f"no database at {path}, where SMARTCOVER_DATABASE_URL points (it is"
            f" sqlite:///{url.database}, the default when unset): set it to the service's"
            " database, or create this one with `smartcover db upgrade`"
        )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver would otherwise issue its own BEGIN lazily, before the first write only,
    # which breaks SAVEPOINT and leaves reads outside the transaction; we emit it ourselves.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # WAL: readers (the API, the cache refresh) never wait for the writer.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, safe in WAL
        cursor.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    # A deferred transaction that reads, then writes after another writer committed fails
    # at once with SQLITE_BUSY (the busy timeout does not apply): writers take the lock first.
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose objects stay readable after commit (no lazy reload in async code)."""
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessions: async_sessionmaker[AsyncSession], *, write: bool = True
) -> AsyncIterator[AsyncSession]:
    """A session in one transaction: committed when the block ends, rolled back on error.

    `write=True` takes SQLite's write lock at the start, so a transaction that reads and
    then writes waits its turn instead of failing; use `write=False` for read-only work.
    """
    async with sessions() as session, session.begin():
        if write:
            await session.connection(execution_options={_IMMEDIATE: True})
        yield session


# -- migrations ------------------------------------------------------------------------


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # ConfigParser interpolation would eat a `%` of a URL-encoded password.
        config.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    # env.py runs on this connection (inside our transaction) instead of opening its own.
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Migrate the database to `revision` (default: the newest), in one transaction."""
    async with engine.connect() as connection:
        await connection.execution_options(**{_IMMEDIATE: True})
        async with connection.begin():
            before = await connection.run_sync(_current)
            await connection.run_sync(_upgrade, revision)
            after = await connection.run_sync(_current)
    if before != after:
        logger.info("database migrated from %s to %s", before or "empty", after)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Migrate the database back to `revision` (`base`: no tables at all)."""
    async with engine.begin() as connection:
        await connection.run_sync(_downgrade, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def is_up_to_date(engine: AsyncEngine) -> bool:
    return await current_revision(engine) == head_revision()
