"""Logging set-up for the CLI: one format, level from settings, secrets never formatted in."""

from __future__ import annotations

import logging


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: one line per batch write is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
