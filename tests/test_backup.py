"""`smartcover backup` and `restore`: a round trip keeps every row, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import MetaData, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from typer.testing import CliRunner, Result

from alerting.cases import CaseDesk, CasePolicy, CoverInfo
from alerting.directory import StaticDirectory
from alerting.engine import AlertEngine, AlertMetrics, CoverContext
from alerting.rules import CoverRule
from api.keys import create_key
from api.models import Role
from core import db, pg_tools, registry
from core.contract import Reading
from core.pg_tools import LibpqTarget, libpq_environment
from core.registry_schemas import CoverCreate, DeviceCreate
from smartcover.cli import app
from tests.db_fixtures import BACKENDS, add_units, fresh_database_url, migrated_sessions
from tests.servers import PostgresServer

T0 = 1_800_000_000_000  # a fixed "now" in epoch ms
COVER = "4112030101000001"
DEVICE = "dev-1"

Rows = dict[str, list[tuple[Any, ...]]]


@pytest.fixture(params=BACKENDS)
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """Two fresh databases of one backend: the one backed up, the one restored into."""
    return (
        fresh_database_url(request, tmp_path, "backup_source"),
        fresh_database_url(request, tmp_path, "backup_target"),
    )


def invoke(database_url: str, *args: str) -> Result:
    env = {"SMARTCOVER_DATABASE_URL": database_url, "SMARTCOVER_LOG_LEVEL": "WARNING"}
    return CliRunner().invoke(app, list(args), env=env)


async def _registry(sessions: async_sessionmaker[AsyncSession]) -> None:
    await add_units(sessions)
    async with db.transaction(sessions) as session:
        cover: dict[str, object] = {
            "cover_id": COVER,
            "owner_unit": "WATER",
            "road": "Zhongzhou Road",
        }
        cover |= {"lon": 112.4539, "lat": 34.6197}
        await registry.create_cover(session=session, cover=CoverCreate.model_validate(cover))
        device = DeviceCreate.model_validate({"device_id": DEVICE, "model": "MC-2"})
        await registry.create_device(
            session=session, device=device, secret=registry.new_device_secret()
        )
        await registry.bind_device(session=session, device_id=DEVICE, cover_id=COVER)
        await create_key(session=session, role=Role.CREW, name="Li", unit_code="WATER")


async def _case_with_timeline(sessions: async_sessionmaker[AsyncSession]) -> None:
    """A displaced cover opens a case; the crew acknowledges it and goes on site."""
    context = CoverContext(
        CoverInfo(COVER, "WATER", "Zhongzhou Road"), CoverRule(depth_cm=200, flood_prone=False), 60
    )
    engine = AlertEngine(
        sessions=sessions,
        directory=StaticDirectory([(DEVICE, context)], webhook_units=["WATER"]),
        policy=CasePolicy(),
        metrics=AlertMetrics(CollectorRegistry()),
        clock_ms=lambda: T0,
    )
    engine.evaluate(Reading(DEVICE, 1, T0 - 2000, 0.5, 0.0, 40.0, 3.6), T0)
    engine.evaluate(Reading(DEVICE, 2, T0 - 1000, 0.5, 35.0, 40.0, 3.6), T0)
    await engine.commit_pending()
    async with db.transaction(sessions) as session:
        desk = CaseDesk(session, CasePolicy())
        case = await desk.open_case_of(COVER)
        assert case is not None
        for status in ("acknowledged", "on_site"):
            await desk.transition(case_id=case.id, to=status, actor="Li", note=status, now_ms=T0)


async def _populate(database_url: str) -> None:
    async with migrated_sessions(database_url) as sessions:
        await _registry(sessions)
        await _case_with_timeline(sessions)


async def _rows(database_url: str) -> Rows:
    """Every row of every table, in primary-key order."""
    engine = db.create_engine(database_url)
    try:
        async with engine.connect() as connection:
            metadata = MetaData()
            await connection.run_sync(metadata.reflect)
            found: Rows = {}
            for name, table in metadata.tables.items():
                query = select(table).order_by(*table.primary_key.columns)
                found[name] = [tuple(row) for row in await connection.execute(query)]
            return found
    finally:
        await engine.dispose()


def test_a_round_trip_keeps_every_row(urls: tuple[str, str], tmp_path: Path) -> None:
    source, target = urls
    asyncio.run(_populate(source))
    before = asyncio.run(_rows(source))
    assert len(before["cases"]) == 1
    # opened, then acknowledged and on site: the timeline the restore must keep
    assert len(before["case_events"]) >= 3
    assert before["alerts"]
    assert before["outbox"]
    assert before["api_keys"]
    file = tmp_path / "smartcover.backup"

    made = invoke(source, "backup", str(file))
    assert made.exit_code == 0, made.output
    assert f"schema {db.head_revision()}" in made.stdout
    assert stat.S_IMODE(file.stat().st_mode) == 0o600  # it holds hashes and secrets
    restored = invoke(target, "restore", str(file))
    assert restored.exit_code == 0, restored.output

    assert asyncio.run(_rows(target)) == before
    asyncio.run(_resolve(target))  # the restored case goes on: its timeline grows
    assert len(asyncio.run(_rows(target))["case_events"]) == len(before["case_events"]) + 1


async def _resolve(database_url: str) -> None:
    async with migrated_sessions(database_url) as sessions, db.transaction(sessions) as session:
        desk = CaseDesk(session, CasePolicy())
        case = await desk.open_case_of(COVER)
        assert case is not None
        await desk.transition(case_id=case.id, to="resolved", actor="Li", note="", now_ms=T0)


def test_a_sqlite_backup_is_consistent_while_the_service_writes(tmp_path: Path) -> None:
    source = tmp_path / "live.db"
    asyncio.run(_populate(f"sqlite:///{source}"))
    # The service in the middle of a write: it holds the write lock, nothing committed yet.
    writer = sqlite3.connect(source, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM case_events")
        file = tmp_path / "live.backup"
        made = invoke(f"sqlite:///{source}", "backup", str(file))
        assert made.exit_code == 0, made.output
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    restored = f"sqlite:///{tmp_path / 'restored.db'}"
    assert invoke(restored, "restore", str(file)).exit_code == 0
    assert asyncio.run(_rows(restored)) == asyncio.run(_rows(f"sqlite:///{source}"))


def test_restore_refuses_a_database_with_data_unless_forced(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    source, target = urls
    asyncio.run(_populate(source))
    file = tmp_path / "smartcover.backup"
    assert invoke(source, "backup", str(file)).exit_code == 0

    async def other_data() -> None:
        async with migrated_sessions(target) as sessions:
            await add_units(sessions)

    asyncio.run(other_data())
    refused = invoke(target, "restore", str(file))
    assert refused.exit_code == 2
    assert "--force" in refused.stderr
    assert asyncio.run(_rows(target))["cases"] == []  # left as it was

    forced = invoke(target, "restore", "--force", str(file))
    assert forced.exit_code == 0, forced.output
    assert asyncio.run(_rows(target)) == asyncio.run(_rows(source))


def test_a_migrated_but_empty_database_is_restored_into(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    source, target = urls
    asyncio.run(_populate(source))
    file = tmp_path / "smartcover.backup"
    assert invoke(source, "backup", str(file)).exit_code == 0
    asyncio.run(_migrated_only(target))  # what `smartcover db upgrade` leaves
    restored = invoke(target, "restore", str(file))
    assert restored.exit_code == 0, restored.output
    assert len(asyncio.run(_rows(target))["case_events"]) >= 3


async def _migrated_only(database_url: str) -> None:
    async with migrated_sessions(database_url):
        pass


def test_restore_refuses_a_postgresql_database_others_are_connected_to(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    source = postgres_server.url(_new_database(postgres_server))
    target = postgres_server.url(_new_database(postgres_server))
    asyncio.run(_populate(source))
    file = tmp_path / "smartcover.backup"
    assert invoke(source, "backup", str(file)).exit_code == 0

    async def restore_while_connected() -> Result:
        service = db.create_engine(target)  # a smartcover process still running
        try:
            async with service.connect():
                return await asyncio.to_thread(invoke, target, "restore", str(file))
        finally:
            await service.dispose()

    refused = asyncio.run(restore_while_connected())
    assert refused.exit_code == 2
    assert "stop every smartcover process" in refused.stderr
    assert invoke(target, "restore", str(file)).exit_code == 0  # once it is gone


def test_a_failed_postgresql_restore_leaves_the_database_as_it_was(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    source_db, target_db = _new_database(postgres_server), _new_database(postgres_server)
    source, target = postgres_server.url(source_db), postgres_server.url(target_db)
    asyncio.run(_populate(source))
    file = tmp_path / "smartcover.backup"
    assert invoke(source, "backup", str(file)).exit_code == 0
    asyncio.run(_populate(target))
    # Someone's report on the cases: the restore cannot replace the table under it.
    postgres_server.psql("CREATE VIEW open_cases AS SELECT id FROM cases", target_db)
    before = asyncio.run(_rows(target))

    failed = invoke(target, "restore", "--force", str(file))
    assert failed.exit_code == 2
    assert "other objects depend on it" in failed.stderr
    assert asyncio.run(_rows(target)) == before


def test_a_deployments_own_schema_is_neither_backed_up_nor_disturbed(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """docker-compose's initdb script adds a `grafana` schema beside the service's tables."""
    source_db, target_db = _new_database(postgres_server), _new_database(postgres_server)
    source, target = postgres_server.url(source_db), postgres_server.url(target_db)
    asyncio.run(_populate(source))
    asyncio.run(_migrated_only(target))
    postgres_server.psql(GRAFANA_SCHEMA % "SELECT -1::bigint", source_db)
    postgres_server.psql(GRAFANA_SCHEMA % "SELECT count(*) FROM public.cases", target_db)
    file = tmp_path / "smartcover.backup"
    assert invoke(source, "backup", str(file)).exit_code == 0

    restored = invoke(target, "restore", str(file))
    assert restored.exit_code == 0, restored.output
    # The target's own function, not the source's, reading the restored table.
    assert postgres_server.psql("SELECT grafana.case_count()", target_db).strip() == "1"


GRAFANA_SCHEMA = """
CREATE SCHEMA grafana;
CREATE FUNCTION grafana.case_count() RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER
AS $$ %s $$;
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_refuses_a_backup_of_the_other_kind(
    backend: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'source.db'}"
    postgres_url = postgres_server.url(_new_database(postgres_server))
    made_from, restored_into = (
        (sqlite_url, postgres_url) if backend == "sqlite" else (postgres_url, sqlite_url)
    )
    asyncio.run(_migrated_only(made_from))
    file = tmp_path / "smartcover.backup"
    assert invoke(made_from, "backup", str(file)).exit_code == 0

    refused = invoke(restored_into, "restore", str(file))
    assert refused.exit_code == 2
    assert f"is a {backend} backup" in refused.stderr


def _new_database(server: PostgresServer) -> str:
    name = f"backup_kind_{uuid.uuid4().hex[:10]}"
    server.create_database(name)
    return name


def test_restore_refuses_a_file_that_is_no_backup(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a backup\n", encoding="utf-8")
    refused = invoke(f"sqlite:///{tmp_path / 'x.db'}", "restore", str(file))
    assert refused.exit_code == 2
    assert "not a smartcover backup" in refused.stderr
    plain = tmp_path / "plain.db"
    asyncio.run(_sqlite_without_schema(plain))
    refused = invoke(f"sqlite:///{tmp_path / 'x.db'}", "restore", str(plain))
    assert refused.exit_code == 2
    assert "not a smartcover database" in refused.stderr


async def _sqlite_without_schema(path: Path) -> None:
    engine = db.create_engine(f"sqlite:///{path}")
    try:
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    finally:
        await engine.dispose()


def test_a_backup_of_an_older_schema_comes_up_to_date(tmp_path: Path) -> None:
    old = f"sqlite:///{tmp_path / 'old.db'}"

    async def at_0003() -> None:
        engine = db.create_engine(old)
        try:
            await db.upgrade(engine, "0003")
            await add_units(db.session_factory(engine))
        finally:
            await engine.dispose()

    asyncio.run(at_0003())
    file = tmp_path / "old.backup"
    assert invoke(old, "backup", str(file)).exit_code == 0
    new = f"sqlite:///{tmp_path / 'new.db'}"
    restored = invoke(new, "restore", str(file))
    assert restored.exit_code == 0, restored.output
    assert f"migrated to {db.head_revision()}" in restored.stdout
    rows = asyncio.run(_rows(new))
    assert rows["alembic_version"] == [(db.head_revision(),)]
    assert len(rows["units"]) == 3


def test_the_password_goes_to_a_private_passfile_not_the_command_line() -> None:
    target = LibpqTarget.of("postgresql+asyncpg://svc:pa:ss%40w\\rd@db.example:5433/smartcover")
    assert target.url == "postgresql://svc@db.example:5433/smartcover"
    assert target.password == "pa:ss@w\\rd"  # noqa: S105 -- a made-up one, to see it escaped
    with libpq_environment(target.password) as env:
        passfile = Path(env["PGPASSFILE"])
        assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
        assert passfile.read_text(encoding="utf-8") == "*:*:*:*:pa\\:ss@w\\\\rd\n"
        assert "PGPASSWORD" not in env
    assert not passfile.exists()


def _fake_tool(directory: Path, name: str, major: int) -> None:
    """A stand-in that only answers --version, as the given major version would."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{name} (PostgreSQL) {major}.3'\n", encoding="utf-8")
    script.chmod(0o755)


def test_client_programs_missing_or_too_old_say_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_tools, "PG_LIB_DIR", tmp_path / "lib")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(pg_tools.PgToolError, match=r"pg_dump not found.*postgresql-client-16"):
        asyncio.run(pg_tools.find_tool("pg_dump", server_major=16))

    _fake_tool(tmp_path / "bin", "pg_dump", 13)
    with pytest.raises(pg_tools.PgToolError, match=r"pg_dump 13 .* older than the server"):
        asyncio.run(pg_tools.find_tool("pg_dump", server_major=16))

    _fake_tool(tmp_path / "lib" / "16" / "bin", "pg_dump", 16)
    found = asyncio.run(pg_tools.find_tool("pg_dump", server_major=16))
    assert (found.path, found.major) == (tmp_path / "lib" / "16" / "bin" / "pg_dump", 16)


def test_a_password_protected_server_is_backed_up_and_restored(
    tmp_path: Path,
) -> None:
    """The URL's password reaches pg_dump and pg_restore (through the passfile) and no log."""
    # A cluster of its own: the session's trusts everyone, which would prove nothing here.
    base = Path(tempfile.mkdtemp(prefix="smartcover-pg-"))
    try:
        base.chmod(0o755)  # as root, the server runs as another user who must reach it
        with PostgresServer(base / "pg") as server:
            server.psql("ALTER USER postgres PASSWORD 'p:w\\x@y'")
            server.create_database("source")
            server.create_database("target")
            (server.data_dir / "pg_hba.conf").write_text(
                "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n",
                encoding="utf-8",
            )
            server.psql("SELECT pg_reload_conf()")
            quoted = "p%3Aw%5Cx%40y"  # p:w\x@y, as a URL spells it
            source = f"postgresql://postgres:{quoted}@{server.host}:{server.port}/source"
            asyncio.run(_populate(source))
            file = tmp_path / "smartcover.backup"
            made = invoke(source, "backup", str(file))
            assert made.exit_code == 0, made.output
            target = source.replace("/source", "/target")
            restored = invoke(target, "restore", str(file))
            assert restored.exit_code == 0, restored.output
            assert asyncio.run(_rows(target)) == asyncio.run(_rows(source))
            assert "p:w" not in made.output + restored.output
    finally:
        shutil.rmtree(base, ignore_errors=True)
