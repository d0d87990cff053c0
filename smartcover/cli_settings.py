"""The settings a command of the CLI starts from: read once, or refused with the reason."""

from __future__ import annotations

import typer
from pydantic import ValidationError
from rich.console import Console

from core.settings import Settings

# The exit code of every command whose settings are refused (as for a refused argument).
EXIT_INVALID_SETTINGS = 2


def load_settings() -> Settings:
    """The validated settings; an invalid value ends the command, naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        Console(stderr=True).print(f"[red]Invalid settings:[/red]\n{exc}")
        raise typer.Exit(EXIT_INVALID_SETTINGS) from None
