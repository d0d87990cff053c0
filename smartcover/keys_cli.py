"""`smartcover keys create|list|revoke`: API keys, mounted by smartcover.cli."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.errors import ApiError
from api.keys import ApiKey, create_key, list_keys, revoke_key
from api.models import Role
from core import db, logs
from smartcover.cli_settings import load_settings

app = typer.Typer(
    help="API keys: create (the key is shown once), list, revoke.", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)

EXIT_UNUSABLE = 2  # settings, database or arguments refused

_T = TypeVar("_T")


def _run(work: Callable[[async_sessionmaker[AsyncSession]], Awaitable[_T]]) -> _T:
    """Runs `work` in one transaction on the configured database, which must be migrated."""
    settings = load_settings()
    logs.configure(settings.log_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    async def main() -> _T:
        engine = db.create_engine(settings.database_url, must_exist=True)
        try:
            if not await db.is_up_to_date(engine):
                raise ApiError("the database is not migrated: run `smartcover db upgrade` first")
            return await work(db.session_factory(engine))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except ApiError as exc:
        errors.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None
    except (SQLAlchemyError, OSError) as exc:
        errors.print(f"[red]Database {settings.database_url.split('@')[-1]}: {exc}[/red]")
        raise typer.Exit(EXIT_UNUSABLE) from None


@app.command()
def create(
    role: Annotated[Role, typer.Option(help="viewer < crew < dispatcher < admin.")],
    unit: Annotated[
        str | None, typer.Option(help="The unit a crew key works for (crew keys only).")
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Who holds the key: the actor recorded on their case moves."),
    ] = None,
) -> None:
    """Creates a key and prints it on stdout, once: only its hash is kept."""
    holder = name or (f"{role.value} {unit}" if unit else role.value)

    async def work(sessions: async_sessionmaker[AsyncSession]) -> tuple[ApiKey, str]:
        async with db.transaction(sessions) as session:
            return await create_key(session=session, role=role, name=holder, unit_code=unit)

    record, key = _run(work)
    scope = f", unit {record.unit_code}" if record.unit_code else ""
    errors.print(
        f"Key {record.id} for {record.name!r} ({record.role.value}{scope}). It is shown only"
        " now: store it, then send it as `Authorization: Bearer <key>`."
    )
    typer.echo(key)


@app.command("list")
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
) -> None:
    """Lists keys: id, the key's first characters, holder, role, unit, dates."""

    async def work(sessions: async_sessionmaker[AsyncSession]) -> list[ApiKey]:
        async with db.transaction(sessions, write=False) as session:
            return await list_keys(session=session, include_revoked=all_)

    keys = _run(work)
    table = Table("id", "key", "holder", "role", "unit", "created (UTC)", "revoked (UTC)")
    for key in keys:
        table.add_row(
            str(key.id),
            f"{key.prefix}…",
            key.name,
            key.role.value,
            key.unit_code or "",
            f"{key.created_at:%Y-%m-%d %H:%M}" if key.created_at else "",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
        )
    console.print(table if keys else "No keys.")


@app.command()
def revoke(key_id: Annotated[int, typer.Argument(help="The key's id (see `keys list`).")]) -> None:
    """Revokes a key at once; requests with it are refused from now on."""

    async def work(sessions: async_sessionmaker[AsyncSession]) -> ApiKey:
        async with db.transaction(sessions) as session:
            return await revoke_key(session=session, key_id=key_id)

    record = _run(work)
    console.print(f"Key {record.id} ({record.prefix}…, {record.name!r}) revoked.")
