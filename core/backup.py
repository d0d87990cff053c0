"""Backup and restore of the relational store: pg_dump/pg_restore, or SQLite's backup API.

A backup holds everything the relational store holds (registry, alert state, alerts, cases
and their timelines, the outbox, API keys); the time series live elsewhere (InfluxDB or
the embedded time-series store) and are not part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import exists, inspect, select, table, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import db
from core.pg_tools import LibpqTarget, PgToolError, find_tool, run_tool

logger = logging.getLogger(__name__)

# A file's first bytes say what made it.
_SQLITE_MAGIC = b"SQLite format 3\x00"
_PG_CUSTOM_MAGIC = b"PGDMP"
# Tables the migrations fill by themselves: rows there do not make a database "in use".
_BOOKKEEPING = frozenset({"alembic_version", "registry_version"})
# A table's line in `pg_restore --list`: "215; 1259 16390 TABLE public cases owner".
_LISTED_TABLE = re.compile(r"^\d+; \d+ \d+ TABLE \S+ (\S+) ", re.MULTILINE)
# How long SQLite waits for the service's writer before giving up (as the service does).
_SQLITE_TIMEOUT_S = db.SQLITE_BUSY_TIMEOUT_MS / 1000


class BackupError(Exception):
    """A backup or restore was refused or failed; the message says why and what to do."""


class Kind(StrEnum):
    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True, slots=True)
class BackupOutcome:
    kind: Kind
    revision: str  # the schema revision the backup holds


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    kind: Kind
    restored_revision: str  # as in the backup
    revision: str  # after the migrations ran


def kind_of_url(database_url: str) -> Kind:
    try:
        backend = make_url(db.async_url(database_url)).get_backend_name()
    except db.DatabaseUrlError as exc:
        raise BackupError(str(exc)) from None
    return Kind.SQLITE if backend == "sqlite" else Kind.POSTGRESQL


def kind_of_file(path: Path) -> Kind:
    """Which kind of backup `path` is, from its first bytes."""
    try:
        with path.open("rb") as stream:
            head = stream.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    if head.startswith(_SQLITE_MAGIC):
        return Kind.SQLITE
    if head.startswith(_PG_CUSTOM_MAGIC):
        return Kind.POSTGRESQL
    raise BackupError(f"{path} is not a smartcover backup (neither SQLite nor pg_dump -Fc)")


def redacted(database_url: str) -> str:
    return make_url(database_url).render_as_string(hide_password=True)


def _check_known(revision: str, path: Path) -> None:
    script = ScriptDirectory.from_config(db.alembic_config())
    if revision not in {rev.revision for rev in script.walk_revisions()}:
        raise BackupError(
            f"{path} holds schema revision {revision!r}, which this smartcover does not know:"
            " it was made by a newer version; restore it with that version"
        )


@contextlib.contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """A private temporary file beside `path`, moved onto it only when complete."""
    try:
        descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise BackupError(f"cannot write beside {path}: {exc.strerror}") from None
    os.close(descriptor)  # mode 0600: a backup holds password hashes and webhook secrets
    temporary = Path(name)
    try:
        yield temporary
        with temporary.open("rb") as stream:
            os.fsync(stream.fileno())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


# -- what a database holds ----------------------------------------------------------------


async def _tables_in_use(engine: AsyncEngine) -> list[str]:
    """Tables holding rows, besides the migrations' own bookkeeping."""
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        used = []
        for name in sorted(set(names) - _BOOKKEEPING):
            if await connection.scalar(select(exists().select_from(table(name)))):
                used.append(name)
    return used


async def _refuse_if_in_use(engine: AsyncEngine, target: str, *, force: bool) -> None:
    used = await _tables_in_use(engine)
    if used and not force:
        raise BackupError(
            f"{target} is not empty ({', '.join(used)} hold rows): give --force to replace"
            " everything in it with the backup"
        )
    if used:
        logger.warning("replacing the contents of %s (forced)", target)


async def _migrate(engine: AsyncEngine) -> str:
    await db.upgrade(engine)
    revision = await db.current_revision(engine)
    if revision is None:
        raise BackupError("the migrations left no schema revision behind")
    return revision


# -- SQLite ---------------------------------------------------------------------------------


def _sqlite_path(database_url: str) -> Path:
    name = make_url(database_url).database
    if name in (None, "", ":memory:"):
        raise BackupError("an in-memory SQLite database cannot be backed up or restored")
    return Path(name)


def _sqlite_revision(path: Path) -> str:
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=_SQLITE_TIMEOUT_S)) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a smartcover database: {exc}") from None
    if row is None:
        raise BackupError(f"{path} is not a smartcover database: no schema revision")
    return str(row[0])


def _sqlite_copy(source: Path, target: Path, *, standalone: bool) -> None:
    """Copies a database page by page, consistent even while the service writes to it.

    `standalone`: the copy keeps no write-ahead log beside it, so one file is the backup.
    """
    with (
        contextlib.closing(sqlite3.connect(source, timeout=_SQLITE_TIMEOUT_S)) as src,
        contextlib.closing(sqlite3.connect(target, timeout=_SQLITE_TIMEOUT_S)) as dst,
    ):
        src.backup(dst)
        if standalone:
            dst.execute("PRAGMA journal_mode=DELETE")


def _backup_sqlite_file(source: Path, path: Path) -> str:
    """Writes the backup; returns the schema revision it holds."""
    if not source.is_file():
        raise BackupError(f"{source} does not exist: nothing to back up")
    with _atomic_output(path) as temporary:
        try:
            _sqlite_copy(source, temporary, standalone=True)
        except sqlite3.Error as exc:
            raise BackupError(f"backup of {source} failed: {exc}") from None
        return _sqlite_revision(temporary)


async def _backup_sqlite(database_url: str, path: Path) -> BackupOutcome:
    source = _sqlite_path(database_url)
    revision = await asyncio.to_thread(_backup_sqlite_file, source, path)
    return BackupOutcome(Kind.SQLITE, revision)


async def _restore_sqlite(database_url: str, path: Path, *, force: bool) -> RestoreOutcome:
    restored = _sqlite_revision(path)
    _check_known(restored, path)
    target = _sqlite_path(database_url)
    target.parent.mkdir(parents=True, exist_ok=True)
    engine = db.create_engine(database_url)
    try:
        await _refuse_if_in_use(engine, str(target), force=force)
        await engine.dispose()  # no connection of ours may hold the file while it is replaced
        try:
            await asyncio.to_thread(_sqlite_copy, path, target, standalone=False)
        except sqlite3.Error as exc:
            raise BackupError(f"restore into {target} failed: {exc}") from None
        return RestoreOutcome(Kind.SQLITE, restored, await _migrate(engine))
    finally:
        await engine.dispose()


# -- PostgreSQL -----------------------------------------------------------------------------


async def _server_major(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        number = await connection.scalar(text("SHOW server_version_num"))
    return int(number) // 10000


async def _refuse_if_connected(engine: AsyncEngine, target: str, *, force: bool) -> None:
    # A running service would see its tables vanish under it and keep stale alert state.
    # Only our own user's: other roles (Grafana's reader) read through functions, harmlessly.
    async with engine.connect() as connection:
        others = await connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND usename = current_user AND pid <> pg_backend_pid()"
            )
        )
    if others and not force:
        raise BackupError(
            f"{others} other connection(s) to {target} as its user: stop every smartcover"
            " process using it first (or give --force)"
        )


def _archive_revision(listing: str, path: Path) -> str:
    """The revision in pg_restore's SQL of the alembic_version table's data."""
    lines = listing.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.startswith("COPY ") and "alembic_version" in line:
            return lines[index + 1].strip()
    raise BackupError(f"{path} is not a backup of a smartcover database (no schema revision)")


def _archive_tables(listing: str) -> set[str]:
    """The tables in pg_restore's table of contents (`--list`)."""
    return set(_LISTED_TABLE.findall(listing))


async def _drop_tables_not_in(engine: AsyncEngine, archived: set[str]) -> None:
    # pg_restore --clean replaces the archive's own tables inside its one transaction;
    # tables it does not know (a newer schema's) would stay behind and trip the migrations.
    async with engine.begin() as connection:
        names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        quote = connection.dialect.identifier_preparer.quote
        for name in sorted(set(names) - archived):
            await connection.execute(text(f"DROP TABLE IF EXISTS {quote(name)} CASCADE"))


async def _backup_postgresql(database_url: str, path: Path) -> BackupOutcome:
    target = LibpqTarget.of(database_url)
    engine = db.create_engine(database_url)
    try:
        revision = await db.current_revision(engine)
        major = await _server_major(engine)
        async with engine.connect() as connection:
            schema = await connection.scalar(text("SELECT current_schema()"))
    finally:
        await engine.dispose()
    if revision is None:
        raise BackupError(f"{redacted(database_url)} is not a smartcover database (not migrated)")
    tool = await find_tool("pg_dump", server_major=major)
    with _atomic_output(path) as temporary:
        args = ["--format=custom", f"--file={temporary}", f"--dbname={target.url}"]
        # Our tables only: not what a deployment adds beside them (the `grafana` schema of
        # docker-compose's initdb script), which a restore would then collide with.
        args.append(f'--table="{schema}".*')
        await run_tool(tool, args, password=target.password)
    return BackupOutcome(Kind.POSTGRESQL, revision)


async def _restore_postgresql(database_url: str, path: Path, *, force: bool) -> RestoreOutcome:
    target = LibpqTarget.of(database_url)
    engine = db.create_engine(database_url)
    try:
        tool = await find_tool("pg_restore", server_major=await _server_major(engine))
        listing = await run_tool(
            tool, ["--data-only", "--table=alembic_version", "--file=-", str(path)], password=None
        )
        restored = _archive_revision(listing, path)
        _check_known(restored, path)
        await _refuse_if_in_use(engine, redacted(database_url), force=force)
        await _refuse_if_connected(engine, redacted(database_url), force=force)
        contents = await run_tool(tool, ["--list", str(path)], password=None)
        await _drop_tables_not_in(engine, _archive_tables(contents))
        # All or nothing: what the database held stays if the restore fails. Owners and
        # grants are the old server's; here the configured user owns everything.
        args = ["--clean", "--if-exists", "--single-transaction", "--exit-on-error"]
        args += ["--no-owner", "--no-privileges"]
        args += [f"--dbname={target.url}", str(path)]
        await run_tool(tool, args, password=target.password)
        return RestoreOutcome(Kind.POSTGRESQL, restored, await _migrate(engine))
    finally:
        await engine.dispose()


# -- the two operations ---------------------------------------------------------------------


async def backup(database_url: str, path: Path) -> BackupOutcome:
    """Writes a backup of the database to `path` (replaced only once the backup is whole)."""
    kind = kind_of_url(database_url)
    try:
        if kind is Kind.SQLITE:
            outcome = await _backup_sqlite(database_url, path)
        else:
            outcome = await _backup_postgresql(database_url, path)
    except PgToolError as exc:
        raise BackupError(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise BackupError(f"database {redacted(database_url)}: {exc}") from None
    logger.debug(  # the command prints it; other callers may want it
        "backup of %s (schema %s) written to %s", redacted(database_url), outcome.revision, path
    )
    return outcome


async def restore(database_url: str, path: Path, *, force: bool = False) -> RestoreOutcome:
    """Replaces the database's contents with the backup at `path`, then migrates it.

    Refuses a database that holds data unless `force`, and a backup of the other kind.
    Stop every smartcover process using the database first.
    """
    kind = kind_of_url(database_url)
    found = kind_of_file(path)
    if found is not kind:
        raise BackupError(
            f"{path} is a {found.value} backup, but SMARTCOVER_DATABASE_URL is {kind.value}"
        )
    try:
        if kind is Kind.SQLITE:
            outcome = await _restore_sqlite(database_url, path, force=force)
        else:
            outcome = await _restore_postgresql(database_url, path, force=force)
    except PgToolError as exc:
        raise BackupError(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        raise BackupError(f"database {redacted(database_url)}: {exc}") from None
    logger.debug(
        "%s restored into %s (schema %s, now %s)",
        path,
        redacted(database_url),
        outcome.restored_revision,
        outcome.revision,
    )
    return outcome
