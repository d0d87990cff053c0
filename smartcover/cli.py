"""The `smartcover` command: one entry point, a subcommand per part (DESIGN §9)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from core import logs
from ingest.bootstrap import ConfigurationError, deadletter_log
from smartcover.backup_cli import backup_command, restore_command
from smartcover.cli_settings import load_settings
from smartcover.codecs_cli import app as codecs_app
from smartcover.devices_cli import app as devices_app
from smartcover.keys_cli import app as keys_app
from smartcover.registry_cli import covers_app, db_app, units_app
from smartcover.retention_cli import retention_command
from smartcover.sim_cli import sim

app = typer.Typer(
    help="smartcover: sensor-equipped manhole covers, from MQTT to dispatch.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(covers_app, name="covers", help="The cover census: import and list.")
app.add_typer(units_app, name="units", help="Owner and maintainer units.")
app.add_typer(db_app, name="db", help="The relational store: migrations.")
app.add_typer(devices_app, name="devices", help="Sensor credentials and the broker's files.")
app.add_typer(keys_app, name="keys", help="API keys and their roles.")
app.add_typer(codecs_app, name="codecs", help="Device models: payload codecs, and testing one.")
app.command()(sim)
app.command("backup")(backup_command)
app.command("restore")(restore_command)
app.command("retention")(retention_command)
console = Console()


def _run_server(part: str) -> None:
    from smartcover import serve as serving  # noqa: PLC0415 -- keeps `--help` fast

    settings = load_settings()
    logs.configure(settings.log_level)
    try:
        if part == "api":
            asyncio.run(serving.serve_api_only(settings))
        else:
            asyncio.run(serving.serve(settings, full_api=part == "serve"))
    except ConfigurationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


@app.command()
def serve() -> None:
    """Ingest, alerting, notifications and the HTTP API in one process (a single node)."""
    _run_server("serve")


@app.command()
def ingest() -> None:
    """Ingest, alerting and notifications, with only /healthz, /readyz and /metrics."""
    _run_server("ingest")


@app.command()
def api() -> None:
    """The HTTP API alone, on the stores (to serve more users; no MQTT)."""
    _run_server("api")


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo keeps its data (wiped at start).")
    ] = Path(".smartcover-demo"),
    port: Annotated[int, typer.Option(help="Port of the API and dashboard.")] = 8000,
    pace: Annotated[
        float, typer.Option(help="Storyline time factor (0.1: ten times faster).")
    ] = 1.0,
    broker_port: Annotated[
        int, typer.Option(help="Port of the embedded MQTT broker (a free one if taken).")
    ] = 1883,
) -> None:
    """Everything on embedded defaults, nothing to install: broker, stores, covers, story."""
    from smartcover import demo as demo_module  # noqa: PLC0415 -- keeps `--help` fast

    logs.configure("WARNING")
    shutil.rmtree(directory, ignore_errors=True)
    demo_module.main(directory, port, pace, broker_port)


@app.command()
def deadletters(
    limit: Annotated[int, typer.Option(help="How many of the newest to show.")] = 20,
) -> None:
    """Lists the newest dead letters: time, topic, reason and the start of the payload."""
    letters = deadletter_log(load_settings()).newest(limit)
    table = Table("time (UTC)", "topic", "reason", "detail", "payload", show_lines=False)
    for letter in letters:
        when = datetime.fromtimestamp(letter.at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(when, letter.topic, letter.reason, letter.detail[:80], letter.payload[:60])
    console.print(table if letters else "No dead letters.")


def main() -> None:
    sys.exit(app())
