"""The live stream: outbox events as server-sent events, resumable by `Last-Event-ID`.

The stream polls the `outbox` table (any process may have written it) and wakes early
when an in-process writer calls `OutboxSignal.notify()`. The SSE `id` is the outbox id.

Ids are handed out when a row is inserted but become visible when its transaction
commits, so on PostgreSQL id 11 can be seen while id 10 is still being committed (or
was rolled back and never will be). Sending 11 at once would lose 10 for a client that
later resumes from 11. The stream therefore sends ids strictly in order and holds back
everything after a gap until the missing id shows up or `gap_grace_s` has passed; a gap
older than that is a rolled-back transaction, and is skipped. SQLite, with one writer at
a time, has no such gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi.sse import ServerSentEvent
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from alerting.models import OutboxRow
from core.db import transaction

logger = logging.getLogger(__name__)

# Rows read per poll: a burst (a storm) is sent in several reads, none of them large.
_BATCH = 200
# What a browser's EventSource waits before reconnecting after the stream drops.
RETRY_MS = 2000


@dataclass(frozen=True, slots=True)
class StreamConfig:
    poll_s: float = 0.5  # how stale the stream may be when no one notifies it
    keepalive_s: float = 15.0  # a comment at least this often keeps proxies from closing it
    gap_grace_s: float = 5.0  # how long an id may take to commit before it is skipped


class OutboxSignal:
    """An in-process wake-up: call `notify()` (from the event loop) after committing
    outbox rows, and open streams read at once instead of at their next poll.
    `close()` ends every open stream (at shutdown: streams never end by themselves)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False

    def notify(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def close(self) -> None:
        self.closed = True
        self.notify()

    async def wait(self, timeout_s: float) -> None:
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


@dataclass(slots=True)
class OutboxCursor:
    """Which outbox ids may be sent now, in order (see the module's note on gaps)."""

    last_id: int
    gap_grace_s: float
    # For each gap seen: the id before it → when it was first seen (monotonic seconds).
    _gaps: dict[int, float] = field(default_factory=dict)

    def take(self, ids: Sequence[int], now: float) -> int:
        """How many of `ids` (ascending, all above `last_id`) go out now; advances."""
        previous = self.last_id
        for id_ in ids:
            if id_ != previous + 1:
                self._gaps.setdefault(previous, now)
            previous = id_
        taken = 0
        for id_ in ids:
            if id_ != self.last_id + 1:
                if now - self._gaps[self.last_id] < self.gap_grace_s:
                    break
                logger.info("outbox ids %d-%d never committed: skipped", self.last_id + 1, id_ - 1)
            self.last_id = id_
            taken += 1
        self._gaps = {after: seen for after, seen in self._gaps.items() if after >= self.last_id}
        return taken


def event_of(row: OutboxRow) -> ServerSentEvent:
    """The webhook's body (DESIGN §11: event_id, type, occurred_at, the object), plus unit."""
    data: dict[str, Any] = {
        "event_id": row.event_id,
        "type": row.type,
        "occurred_ms": row.occurred_ms,
        "unit_code": row.unit_code,
    }
    for key, value in row.payload.items():
        data.setdefault(key, value)
    return ServerSentEvent(id=str(row.id), event=row.type, data=data)


async def newest_id(session: AsyncSession) -> int:
    return await session.scalar(select(func.max(OutboxRow.id))) or 0


async def _after(sessions: async_sessionmaker[AsyncSession], last_id: int) -> list[OutboxRow]:
    # Shielded: a client hanging up cancels the stream, and a read cancelled midway makes
    # SQLAlchemy abandon the connection (aiosqlite's is then never closed). A read takes
    # milliseconds; the cancellation lands right after it.
    query = select(OutboxRow).where(OutboxRow.id > last_id).order_by(OutboxRow.id).limit(_BATCH)
    rows: list[OutboxRow] = []
    with anyio.CancelScope(shield=True):
        async with transaction(sessions, write=False) as session:
            rows = list(await session.scalars(query))
    return rows


async def outbox_events(
    *,
    sessions: async_sessionmaker[AsyncSession],
    signal: OutboxSignal,
    config: StreamConfig,
    unit_code: str | None,
    last_id: int | None,
) -> AsyncIterator[ServerSentEvent]:
    """Events after `last_id` (or from now on), of one unit or all, until the signal closes."""
    start = last_id or 0
    if last_id is None:
        with anyio.CancelScope(shield=True):  # as in `_after`
            async with transaction(sessions, write=False) as session:
                start = await newest_id(session)
    cursor = OutboxCursor(start, config.gap_grace_s)
    # The id gives a client its resume point before the first event: dropped before any
    # event arrives, it still asks for exactly what it missed.
    yield ServerSentEvent(id=str(start), comment=f"smartcover events after {start}", retry=RETRY_MS)
    beat = time.monotonic()
    while not signal.closed:
        rows = await _after(sessions, cursor.last_id)
        ready = cursor.take([row.id for row in rows], time.monotonic())
        for row in rows[:ready]:
            # Other units' ids still move the cursor: a crew's gaps are not gaps.
            if unit_code is None or row.unit_code == unit_code:
                yield event_of(row)
                beat = time.monotonic()
        if ready == _BATCH:
            continue  # more are waiting: no sleep
        if time.monotonic() - beat >= config.keepalive_s:
            yield ServerSentEvent(comment="keep-alive")
            beat = time.monotonic()
        await signal.wait(config.poll_s)
