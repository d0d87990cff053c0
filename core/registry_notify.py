"""Keeps a registry cache current with other processes' changes.

On PostgreSQL every registry write announces itself (`core.registry.bump_version`); one
connection per process LISTENs and refreshes the cache as soon as a change commits. A
slow poll backs it up (a notification sent while this process was reconnecting is not
queued for it), and after every reconnection the cache is refreshed at once. SQLite has no
notifications: there the poll is all, at a shorter interval.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from core.registry import REGISTRY_CHANNEL
from core.registry_cache import RegistryCache

logger = logging.getLogger(__name__)

# Safety poll when notifications carry the news; the poll alone on SQLite.
BACKUP_POLL_S = 30.0
SQLITE_POLL_S = 1.0
# How often the listening loop looks at its stop event and its connection.
_WAKE_S = 1.0
_RECONNECT_S = (0.5, 1.0, 2.0, 5.0)


async def follow_registry(cache: RegistryCache, engine: AsyncEngine, stop: asyncio.Event) -> None:
    """Refreshes `cache` whenever the registry changes, until `stop` is set."""
    if engine.dialect.name != "postgresql":
        await cache.watch(stop, SQLITE_POLL_S)
        return
    async with asyncio.TaskGroup() as group:
        group.create_task(cache.watch(stop, BACKUP_POLL_S), name="registry-poll")
        group.create_task(_listen_forever(cache, engine, stop), name="registry-listen")


async def _listen_forever(cache: RegistryCache, engine: AsyncEngine, stop: asyncio.Event) -> None:
    attempt = 0
    while not stop.is_set():
        try:
            await _listen(cache, engine, stop)
            attempt = 0
        except Exception as exc:  # asyncpg's own errors too: whatever broke, listen again
            delay = _RECONNECT_S[min(attempt, len(_RECONNECT_S) - 1)]
            attempt += 1
            logger.warning(
                "registry notifications lost (%s); listening again in %.1f s", exc, delay
            )
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                continue


async def _listen(cache: RegistryCache, engine: AsyncEngine, stop: asyncio.Event) -> None:
    """One connection's life: LISTEN, refresh on every notification, until it drops."""
    changed = asyncio.Event()
    lost = asyncio.Event()

    def on_notification(*_args: Any) -> None:
        changed.set()

    def on_termination(*_args: Any) -> None:
        lost.set()

    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection  # asyncpg's own connection: it has LISTEN
        assert driver is not None
        driver.add_termination_listener(on_termination)
        await driver.add_listener(REGISTRY_CHANNEL, on_notification)
        logger.info("listening for registry changes on %s", REGISTRY_CHANNEL)
        await cache.refresh()  # whatever changed while nobody listened
        while not stop.is_set() and not lost.is_set():
            try:
                await asyncio.wait_for(changed.wait(), timeout=_WAKE_S)
            except TimeoutError:
                continue
            changed.clear()
            await cache.refresh()
        if lost.is_set():
            raise OSError("the listening connection was closed")
        await driver.remove_listener(REGISTRY_CHANNEL, on_notification)
