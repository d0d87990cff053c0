"""`smartcover covers|units|db …`: the registry's subcommands, mounted by smartcover.cli."""

from __future__ import annotations

import asyncio
import csv
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core import db, logs, registry
from core.census import CensusFileError, CensusReport, RowError, import_census, read_census_file
from core.census import summary as census_summary
from core.registry_errors import RegistryError
from core.registry_schemas import Unit, UnitKind
from core.settings import Settings
from smartcover.cli_settings import load_settings

covers_app = typer.Typer(help="The cover registry: census import, listing.", no_args_is_help=True)
units_app = typer.Typer(help="Owner and maintainer units.", no_args_is_help=True)
db_app = typer.Typer(help="The relational store (SMARTCOVER_DATABASE_URL).", no_args_is_help=True)
console = Console()
errors = Console(stderr=True)

# Exit codes: 1 = rows rejected, 2 = nothing could be done (settings, file, database).
EXIT_REJECTED = 1
EXIT_UNUSABLE = 2

_T = TypeVar("_T")


def _configure_logging(settings: Settings, *, migrating: bool = False) -> None:
    logs.configure(settings.log_level)
    if not migrating:
        # Alembic says which dialect it found each time we only ask for the revision.
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _run(work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[_T]]) -> _T:
    """Runs `work` against the configured database, which must be migrated."""
    settings = load_settings()
    _configure_logging(settings)

    async def main() -> _T:
        engine = db.create_engine(settings.database_url, must_exist=True)
        try:
            await _require_migrated(engine)
            return await work(db.session_factory(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except RegistryError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None
    except (SQLAlchemyError, OSError) as exc:
        errors.print(f"[red]Database {settings.database_url.split('@')[-1]}: {exc}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None


async def _require_migrated(engine: AsyncEngine) -> None:
    current = await db.current_revision(engine)
    if current != db.head_revision():
        errors.print(
            f"[red]The database is at revision {current or 'none'}, not"
            f" {db.head_revision()}: run `smartcover db upgrade` first.[/red]"
        )
        raise typer.Exit(EXIT_UNUSABLE)


# -- db -------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Creates or migrates the tables to the newest revision (safe to run again)."""
    settings = load_settings()
    _configure_logging(settings, migrating=True)

    async def main() -> str | None:
        engine = db.create_engine(settings.database_url)
        try:
            await db.upgrade(engine)
            return await db.current_revision(engine)
        finally:
            await engine.dispose()

    try:
        revision = asyncio.run(main())
    except (SQLAlchemyError, OSError) as exc:
        errors.print(f"[red]Migration failed: {exc}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None
    console.print(f"Database at revision {revision}.")


# -- covers ---------------------------------------------------------------------------


@covers_app.command("import")
def covers_import(
    file: Annotated[Path, typer.Argument(help="Census file, CSV (UTF-8) or XLSX.", exists=True)],
    *,
    dry_run: Annotated[bool, typer.Option(help="Check everything, write nothing.")] = False,
    ignore_unknown: Annotated[bool, typer.Option(help="Skip columns not in the census.")] = False,
    skip_invalid: Annotated[
        bool, typer.Option(help="Import the valid rows even when others are rejected.")
    ] = False,
    show: Annotated[int, typer.Option(help="Rejected rows to print.")] = 50,
    errors_csv: Annotated[
        Path | None, typer.Option(help="Write every rejected row to this CSV.")
    ] = None,
) -> None:
    """Imports a census (DESIGN §11): all rows or none, unless --skip-invalid."""

    async def work(sessions: async_sessionmaker[AsyncSession]) -> CensusReport | CensusFileError:
        try:
            table = read_census_file(file)
            async with db.transaction(sessions) as session:
                return await import_census(
                    session=session,
                    table=table,
                    ignore_unknown=ignore_unknown,
                    dry_run=dry_run,
                    skip_invalid=skip_invalid,
                )
        except CensusFileError as exc:
            return exc  # shown with its rows below, not as a bare message

    report = _run(work)
    if isinstance(report, CensusFileError):
        errors.print(f"[red]{file}: {report.reason}[/red]")
        _print_errors(report.errors, show)
        raise typer.Exit(EXIT_UNUSABLE)
    _print_report(report, show)
    if errors_csv is not None and report.errors:
        _write_errors(errors_csv, report.errors)
        console.print(f"All {len(report.errors)} problems written to {errors_csv}.")
    if report.errors:
        raise typer.Exit(EXIT_REJECTED)


def _print_errors(found: list[RowError], show: int) -> None:
    if not found:
        return
    table = Table("row", "column", "reason", title="Rejected", title_justify="left")
    for error in found[:show]:
        table.add_row(str(error.row), error.column or "", error.reason)
    errors.print(table)
    if len(found) > show:
        errors.print(f"… and {len(found) - show} more (--show, --errors-csv).")


def _print_report(report: CensusReport, show: int) -> None:
    _print_errors(report.errors, show)
    if report.ignored_columns:
        console.print(f"Ignored columns: {', '.join(report.ignored_columns)}")
    console.print(census_summary(report))


def _write_errors(path: Path, found: list[RowError]) -> None:
    with path.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["row", "column", "reason"])
        writer.writerows((error.row, error.column or "", error.reason) for error in found)


@covers_app.command("list")
def covers_list(
    owner: Annotated[str | None, typer.Option(help="Only this owner unit's covers.")] = None,
    road: Annotated[str | None, typer.Option(help="Only the covers on this road.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many first.")] = 0,
) -> None:
    """Lists covers in number order, with owner, road, state and bound device."""

    async def work(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with db.transaction(sessions, write=False) as session:
            covers = await registry.list_covers(
                session=session, owner_unit=owner, road=road, limit=limit, offset=offset
            )
            total = await registry.count_covers(session=session, owner_unit=owner)
        table = Table("cover", "class", "owner", "road", "lon", "lat", "state", "device")
        for cover in covers:
            table.add_row(
                cover.cover_id,
                cover.kind_code,
                cover.owner_unit,
                cover.road,
                f"{cover.lon:.6f}",
                f"{cover.lat:.6f}",
                cover.state.value,
                cover.device_id or "",
            )
        console.print(table if covers else "No covers.")
        if road is None:
            console.print(f"{len(covers)} shown of {total}.")

    _run(work)


# -- units ----------------------------------------------------------------------------


@units_app.command("create")
def units_create(
    code: Annotated[str, typer.Argument(help="Unit code (used in alerts/{code}).")],
    name: Annotated[str, typer.Argument(help="The unit's name.")],
    *,
    kind: Annotated[UnitKind, typer.Option(help="What kind of unit.")],
    parent: Annotated[str | None, typer.Option(help="Parent unit's code.")] = None,
    webhook_url: Annotated[str | None, typer.Option(help="On-call webhook URL.")] = None,
    webhook_secret: Annotated[
        str | None,
        typer.Option(help="HMAC key of the webhook.", envvar="SMARTCOVER_WEBHOOK_SECRET"),
    ] = None,
    supervisor_contact: Annotated[str | None, typer.Option(help="Escalation contact.")] = None,
) -> None:
    """Registers an owner or maintainer unit (DESIGN §11 unit record)."""
    try:
        unit = Unit(
            code=code,
            name=name,
            kind=kind,
            parent=parent,
            webhook_url=webhook_url,
            webhook_secret=SecretStr(webhook_secret) if webhook_secret is not None else None,
            supervisor_contact=supervisor_contact,
        )
    except ValidationError as exc:
        errors.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None

    async def work(sessions: async_sessionmaker[AsyncSession]) -> Unit:
        async with db.transaction(sessions) as session:
            return await registry.create_unit(session=session, unit=unit)

    created = _run(work)
    console.print(f"Unit {created.code} ({created.kind.value}) created.")


@units_app.command("list")
def units_list() -> None:
    """Lists the units with their kind, parent and contacts."""

    async def work(sessions: async_sessionmaker[AsyncSession]) -> list[Unit]:
        async with db.transaction(sessions, write=False) as session:
            return await registry.list_units(session=session)

    units = _run(work)
    table = Table("code", "name", "kind", "parent", "webhook", "supervisor")
    for unit in units:
        table.add_row(
            unit.code,
            unit.name,
            unit.kind.value,
            unit.parent or "",
            unit.webhook_url or "",
            unit.supervisor_contact or "",
        )
    console.print(table if units else "No units.")
