"""`smartcover sim` as the command line runs it: listing, dry runs, errors, --check."""

from __future__ import annotations

import typer

from smartcover.sim_cli import sim

# Mounted the way smartcover/cli.py mounts it.
sim_app = typer.Typer(add_completion=False)
sim_app.command(name="sim")(sim)


@sim_app.command()
def version() -> None:
    """A second command, so `sim` is a subcommand as in the real CLI."""
