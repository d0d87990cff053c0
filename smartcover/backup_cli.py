"""`smartcover backup FILE` and `smartcover restore FILE`: the relational store, mounted by cli."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core import logs
from core.backup import BackupError, backup, redacted, restore
from core.settings import Settings
from smartcover.cli_settings import load_settings

errors = Console(stderr=True)

EXIT_UNUSABLE = 2  # settings refused, or the backup or restore refused or failed


def _settings() -> Settings:
    settings = load_settings()
    logs.configure(settings.log_level)
    # Alembic's "Running upgrade" lines say what our one summary line says.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return settings


def _fail(exc: BackupError) -> typer.Exit:
    typer.secho(str(exc), fg=typer.colors.RED, err=True)
    return typer.Exit(EXIT_UNUSABLE)


def _size(size_bytes: int) -> str:
    if size_bytes < 1_000_000:
        return f"{size_bytes / 1000:.0f} kB"
    return f"{size_bytes / 1_000_000:.1f} MB"


def backup_command(
    file: Annotated[Path, typer.Argument(help="Where to write the backup (replaced if present).")],
) -> None:
    """Backs up the relational store (SMARTCOVER_DATABASE_URL) while the service runs.

    PostgreSQL: pg_dump's custom format. SQLite: a copy through SQLite's backup API.
    Not included: the time series (InfluxDB or the embedded store), see the README.
    """
    settings = _settings()
    try:
        done = asyncio.run(backup(settings.database_url, file))
    except BackupError as exc:
        raise _fail(exc) from None
    # Plain echo, not rich: a path or URL wrapped over two lines cannot be copied.
    typer.echo(
        f"Backed up {redacted(settings.database_url)} (schema {done.revision}) to {file}"
        f" ({_size(file.stat().st_size)}, {done.kind.value})."
    )


def restore_command(
    file: Annotated[Path, typer.Argument(help="A backup made by `smartcover backup`.")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace a database that already holds data.")
    ] = False,
) -> None:
    """Restores a backup into the relational store, then migrates it to this version.

    Stop every smartcover process using the database first. A database holding data is
    replaced only with --force.
    """
    settings = _settings()
    try:
        done = asyncio.run(restore(settings.database_url, file, force=force))
    except BackupError as exc:
        raise _fail(exc) from None
    migrated = f", migrated to {done.revision}" if done.revision != done.restored_revision else ""
    typer.echo(
        f"Restored {file} (schema {done.restored_revision}) into"
        f" {redacted(settings.database_url)}{migrated}."
    )
