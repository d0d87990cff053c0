"""Which process is active: the holder of a PostgreSQL advisory lock (DESIGN §14).

Several `smartcover serve` processes with the same MQTT client id may run on one
PostgreSQL. The one holding the session-level advisory lock derived from that client id
consumes readings, evaluates and runs the timers and the outbox; the others serve the API
and try the lock every second. PostgreSQL releases the lock when the holder's connection
ends, which for a killed process (`kill -9`, a rebooted machine) is as soon as its socket
closes, so the standby's next try takes it over.

The holder checks its lock connection every second. A check that fails or takes longer
than `CHECK_TIMEOUT_S` means it can no longer commit (and may no longer hold the lock), so
the role is lost at once; the runtime then stops consuming and waits for the lock again.

SQLite has no other process to hand over to: there the sole process is always active.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger(__name__)

# How often a standby tries the lock, and the holder checks its connection.
TRY_EVERY_S = 1.0
CHECK_EVERY_S = 1.0
# A check slower than this counts as a lost database: an active that cannot commit within
# it stalls every acknowledgement anyway.
CHECK_TIMEOUT_S = 3.0


class Role(StrEnum):
    STARTING = "starting"  # the lock not tried yet
    ACTIVE = "active"
    STANDBY = "standby"


def lock_key(client_id: str) -> int:
    """The advisory lock's 64-bit key: the same for every process of one MQTT client id."""
    digest = hashlib.blake2b(f"smartcover-active:{client_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class LeadershipMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.active = Gauge(
            "smartcover_active",
            "1 while this process is active (consumes, evaluates, notifies), 0 on standby",
            registry=registry,
        )
        self.changes = Counter(
            "smartcover_role_changes",
            "Times this process became active or stopped being active",
            ["to"],
            registry=registry,
        )


class Leadership:
    """The active role of one process; `hold()` waits for it and reports its loss."""

    def __init__(self, db: AsyncEngine, client_id: str, metrics: LeadershipMetrics) -> None:
        self._db = db
        self._key = lock_key(client_id)
        self._client_id = client_id
        self._metrics = metrics
        self._sole = db.dialect.name != "postgresql"
        self._connection: AsyncConnection | None = None
        self.role = Role.STARTING

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Waits until this process holds the role (True) or `stop` is set (False)."""
        while not stop.is_set():
            if self._sole or await self._try_lock():
                self._became(Role.ACTIVE, "holds the lock" if not self._sole else "SQLite")
                return True
            if self.role is not Role.STANDBY:
                self._became(Role.STANDBY, "another process holds the lock, or none can")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TRY_EVERY_S)
        return False

    async def watch(self) -> str:
        """While active: returns, with the reason, once the role is lost."""
        if self._sole:
            await asyncio.Event().wait()  # only cancellation ends it
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            problem = await self._check()
            if problem is not None:
                await self._drop_connection()
                self._became(Role.STANDBY, problem)
                return problem

    async def release(self) -> None:
        """Gives the role up (a clean stop): the standby takes over at its next try."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": self._key}
                )
        await self._drop_connection()
        if self.role is Role.ACTIVE:
            self._became(Role.STANDBY, "stopping")

    async def _try_lock(self) -> bool:
        try:
            if self._connection is None:
                self._connection = await self._db.connect()
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                held = await self._connection.scalar(
                    text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}
                )
                await self._connection.commit()  # no transaction left open while we hold it
            return bool(held)
        except Exception as exc:  # unreachable database: nobody can be active through it
            logger.debug("advisory lock not tried: %s", exc)
            await self._drop_connection()
            return False

    async def _check(self) -> str | None:
        connection = self._connection
        if connection is None:
            return "lock connection gone"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await connection.execute(text("SELECT 1"))
                await connection.commit()
        except TimeoutError:
            return f"database did not answer within {CHECK_TIMEOUT_S:.0f} s"
        except Exception as exc:  # whatever broke the connection also ended the lock
            return f"database connection lost ({type(exc).__name__})"
        return None

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()

    def _became(self, role: Role, why: str) -> None:
        self.role = role
        self._metrics.active.set(1 if role is Role.ACTIVE else 0)
        self._metrics.changes.labels(to=role.value).inc()
        log = logger.info if role is Role.ACTIVE else logger.warning
        log("this process is now %s for MQTT client id %s: %s", role.value, self._client_id, why)
