"""The live stream: outbox events as server-sent events, resumable by `Last-Event-ID`.

One `OutboxFeed` per process reads the `outbox` table (any process may have written it):
it polls, and wakes early when an in-process writer calls `OutboxSignal.notify()`. Each
event it reads is encoded once and handed to every open stream, so the database sees the
same queries whether one client listens or five hundred. The SSE `id` is the outbox id.

Ids are handed out when a row is inserted but become visible when its transaction
commits, so on PostgreSQL id 11 can be seen while id 10 is still being committed (or
was rolled back and never will be). Sending 11 at once would lose 10 for a client that
later resumes from 11. The feed therefore passes ids on strictly in order and holds back
everything after a gap until the missing id shows up or `gap_grace_s` has passed; a gap
older than that is a rolled-back transaction, and is skipped. SQLite, with one writer at
a time, has no such gaps. Everything up to the feed's position is settled, which is what
lets a resuming client read the rows up to it from the database and then take the rest
from the feed with neither a gap nor a duplicate.

Each stream is also bound to the API key that opened it. Keys are revoked by other
processes too (`smartcover keys revoke` writes the database), so the feed asks the
database every `key_check_s` which of its streams' keys are still valid, in one query for
all of them, and ends the streams of the others.

Each stream has a bounded queue. A client that falls `queue_events` behind is cut off
with a comment saying why; its browser reconnects with `Last-Event-ID` and catches up
from the database, instead of the process holding an ever longer queue for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import pydantic_core
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from alerting.models import OutboxRow
from api.keys import valid_key_ids
from core.db import transaction

logger = logging.getLogger(__name__)

# Rows read at once: a burst (a storm) is read in several pages, none of them large.
_BATCH = 200
# What a browser's EventSource waits before reconnecting after the stream drops.
RETRY_MS = 2000
KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class StreamConfig:
    poll_s: float = 0.5  # how stale the stream may be when no one notifies it
    keepalive_s: float = 15.0  # a comment at least this often keeps proxies from closing it
    gap_grace_s: float = 5.0  # how long an id may take to commit before it is skipped
    queue_events: int = 1000  # how many events a client may hold unsent before it is cut off
    key_check_s: float = 2.0  # how long a stream may outlive the revocation of its key


class OutboxSignal:
    """An in-process wake-up: call `notify()` (from the event loop) after committing
    outbox rows, and the feed reads at once instead of at its next poll.
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


def comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def opening(start: int) -> bytes:
    """The first message: its id gives a client its resume point before any event, so a
    client dropped before the first event still asks for exactly what it missed."""
    return f": smartcover events after {start}\nid: {start}\nretry: {RETRY_MS}\n\n".encode()


def encode(row: OutboxRow) -> bytes:
    """One event on the wire: the webhook's body (DESIGN §11: event_id, type, occurred_at,
    the object) plus unit as `data`, the type as `event`, the outbox id as `id`."""
    data: dict[str, Any] = {
        "event_id": row.event_id,
        "type": row.type,
        "occurred_ms": row.occurred_ms,
        "unit_code": row.unit_code,
    }
    for key, value in row.payload.items():
        data.setdefault(key, value)
    # pydantic's JSON is one line (as `data:` must be) and writes NaN as null.
    body = pydantic_core.to_json(data).decode()
    return f"id: {row.id}\nevent: {row.type}\ndata: {body}\n\n".encode()


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """An event read once by the feed, encoded once, shared by every stream."""

    id: int
    unit_code: str
    wire: bytes


async def newest_id(session: AsyncSession) -> int:
    return await session.scalar(select(func.max(OutboxRow.id))) or 0


async def read_page(
    sessions: async_sessionmaker[AsyncSession],
    *,
    after: int,
    upto: int | None = None,
    unit_code: str | None = None,
) -> list[OutboxRow]:
    """Up to `_BATCH` rows after `after` (and not above `upto`), of one unit or all."""
    query = select(OutboxRow).where(OutboxRow.id > after).order_by(OutboxRow.id).limit(_BATCH)
    if upto is not None:
        query = query.where(OutboxRow.id <= upto)
    if unit_code is not None:
        query = query.where(OutboxRow.unit_code == unit_code)
    # Shielded: a client hanging up cancels its stream, and a read cancelled midway makes
    # SQLAlchemy abandon the connection (aiosqlite's is then never closed). A read takes
    # milliseconds; the cancellation lands right after it.
    rows: list[OutboxRow] = []
    with anyio.CancelScope(shield=True):
        async with transaction(sessions, write=False) as session:
            rows = list(await session.scalars(query))
    return rows


class Subscription:
    """One stream's share of the feed: a bounded queue of the events it has yet to send.

    It receives nothing until `join`; from then on every event above the id it joined
    at, of its unit (a crew) or of all (`unit_code` None)."""

    def __init__(self, run: _Run, unit_code: str | None, limit: int, key_id: int) -> None:
        self._run = run
        self.unit_code = unit_code
        self.key_id = key_id  # the API key that opened the stream: it ends with the key
        self._limit = limit
        self._after: int | None = None
        self._pending: deque[FeedEvent] = deque()
        self._ready = asyncio.Event()
        self.ended: str | None = run.ended  # why the stream ends, once it must

    @property
    def position(self) -> int:
        """The feed's position: every id up to it has been read (or skipped for good)."""
        return self._run.cursor.last_id

    def join(self, after: int) -> int:
        """Events above max(`after`, position) are queued from now on; returns that id."""
        self._after = max(after, self.position)
        return self._after

    def offer(self, events: Sequence[FeedEvent]) -> None:
        after = self._after
        if self.ended is not None or after is None or events[-1].id <= after:
            return
        if events[0].id <= after:  # joined ahead of the feed (an id from another process)
            events = [event for event in events if event.id > after]
        # One read (at most `_BATCH` events) always fits an empty queue: only a client
        # still holding earlier events is behind.
        if self._pending and len(self._pending) + len(events) > self._limit:
            logger.info("live stream client cut off: more than %d events behind", self._limit)
            self._pending.clear()  # it resumes from the database: drop, do not hold
            self.end(f"too slow: more than {self._limit} events behind; reconnect with"
                     " Last-Event-ID to resume")  # fmt: skip
            return
        self._pending.extend(events)
        self._ready.set()

    def end(self, reason: str) -> None:
        if self.ended is None:
            self.ended = reason
            self._ready.set()

    async def live(self, keepalive_s: float) -> AsyncIterator[bytes]:
        """Queued events as they come (each wake-up's in one chunk), a keep-alive comment
        after `keepalive_s` without any, and a last comment saying why it ends."""
        while True:
            if not self._pending and self.ended is None:
                self._ready.clear()
                with anyio.move_on_after(keepalive_s):
                    await self._ready.wait()
            if self._pending:
                chunk = b"".join(event.wire for event in self._pending)
                self._pending.clear()
                yield chunk
            elif self.ended is not None:
                yield comment(f"stream closed: {self.ended}")
                return
            else:
                yield KEEPALIVE


@dataclass(eq=False, slots=True)
class _Run:
    """One run of the feed's reader, from the first stream opened to the last one closed."""

    cursor: OutboxCursor
    subscribers: set[Subscription] = field(default_factory=set)
    stopping: bool = False
    ended: str | None = None
    task: asyncio.Task[None] | None = None

    def fan_out(self, rows: Sequence[OutboxRow]) -> None:
        events = [FeedEvent(row.id, row.unit_code, encode(row)) for row in rows]
        by_unit: dict[str, list[FeedEvent]] = {}
        for event in events:
            by_unit.setdefault(event.unit_code, []).append(event)
        for subscriber in self.subscribers:
            unit = subscriber.unit_code
            chosen = events if unit is None else by_unit.get(unit)
            if chosen:
                subscriber.offer(chosen)

    def end(self, reason: str) -> None:
        self.ended = reason
        for subscriber in self.subscribers:
            subscriber.end(reason)

    def end_unless_valid(self, valid: set[int]) -> None:
        """Ends every stream whose key is not among the `valid` ones."""
        for subscriber in self.subscribers:
            if subscriber.key_id not in valid and subscriber.ended is None:
                logger.info("live stream of API key %d closed: key revoked", subscriber.key_id)
                subscriber.end("the API key was revoked")


class OutboxFeed:
    """The process's one reader of the outbox, shared by all its open streams.

    It runs while at least one stream is open: the first `subscribe` starts it (one query
    for the newest id), the last one to close stops it and awaits its task."""

    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        signal: OutboxSignal,
        config: StreamConfig,
    ) -> None:
        self.sessions = sessions
        self._signal = signal
        self.config = config
        self._run: _Run | None = None
        self._holders = 0
        self._starting = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def subscribe(self, unit_code: str | None, key_id: int) -> AsyncIterator[Subscription]:
        """A subscription for one stream opened with key `key_id`, for as long as the
        stream is open (or the key is valid)."""
        self._holders += 1
        try:
            run = await self._running()
            subscription = Subscription(run, unit_code, self.config.queue_events, key_id)
            run.subscribers.add(subscription)
            try:
                yield subscription
            finally:
                run.subscribers.discard(subscription)
        finally:
            self._holders -= 1
            if self._holders == 0:
                await self._stop()

    async def _running(self) -> _Run:
        async with self._starting:
            run = self._run
            if run is not None and run.task is not None and run.task.done():
                self._run = None
                run.task.result()  # it failed: say why, here (the next stream starts anew)
            if self._run is None:
                with anyio.CancelScope(shield=True):  # as in `read_page`
                    async with transaction(self.sessions, write=False) as session:
                        start = await newest_id(session)
                run = _Run(OutboxCursor(start, self.config.gap_grace_s))
                run.task = asyncio.create_task(self._serve(run), name="outbox feed")
                self._run = run
            return self._run

    async def _stop(self) -> None:
        run, self._run = self._run, None
        if run is None or run.task is None:
            return
        run.stopping = True
        self._signal.notify()  # the feed is its only listener: wakes it to see `stopping`
        with anyio.CancelScope(shield=True):
            await run.task

    async def _serve(self, run: _Run) -> None:
        """Reads the outbox and checks the streams' keys, until the reading stops."""
        async with asyncio.TaskGroup() as group:
            checking = group.create_task(self._check_keys(run), name="stream key check")
            await self._read(run)
            checking.cancel()

    async def _check_keys(self, run: _Run) -> None:
        """Every `key_check_s`, one query for the keys of all open streams; the streams
        of revoked (or deleted) keys end. A failed query keeps the streams: the next
        check decides, as the next request of such a key is refused anyway."""
        while True:
            await asyncio.sleep(self.config.key_check_s)
            key_ids = {subscriber.key_id for subscriber in run.subscribers}
            if not key_ids:
                continue
            try:
                with anyio.CancelScope(shield=True):  # as in `read_page`
                    async with transaction(self.sessions, write=False) as session:
                        valid = await valid_key_ids(session=session, key_ids=key_ids)
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("live stream: checking the streams' keys failed: %s", exc)
                continue
            run.end_unless_valid(valid)

    async def _read(self, run: _Run) -> None:
        """Reads new rows and hands them out, until the service stops or no one listens."""
        failing = False
        try:
            while not self._signal.closed and not run.stopping:
                try:
                    rows = await read_page(self.sessions, after=run.cursor.last_id)
                except (SQLAlchemyError, OSError) as exc:  # the database away: try again
                    if not failing:
                        logger.warning("live stream: reading the outbox failed: %s", exc)
                    failing = True
                    await self._signal.wait(self.config.poll_s)
                    continue
                failing = False
                ready = run.cursor.take([row.id for row in rows], time.monotonic())
                if ready:
                    run.fan_out(rows[:ready])  # no await since `take`: position and queues agree
                if ready < _BATCH:  # else more are waiting: no sleep
                    await self._signal.wait(self.config.poll_s)
        finally:
            run.end("the service is stopping" if self._signal.closed else "the feed stopped")


async def outbox_events(
    *, feed: OutboxFeed, unit_code: str | None, last_id: int | None, key_id: int
) -> AsyncGenerator[bytes, None]:
    """The stream's bytes: events after `last_id` (or from now on), of one unit or all,
    until the service stops, the key `key_id` is revoked or the client falls too far
    behind."""
    async with feed.subscribe(unit_code, key_id) as subscription:
        start = subscription.position if last_id is None else last_id
        yield opening(start)
        async for chunk in _catch_up(feed.sessions, subscription, start):
            yield chunk
        async for chunk in subscription.live(feed.config.keepalive_s):
            yield chunk


async def _catch_up(
    sessions: async_sessionmaker[AsyncSession], subscription: Subscription, after: int
) -> AsyncIterator[bytes]:
    """Rows after `after` from the database, page by page, until the subscription joins
    the feed; rows up to the id it joined at come from here, the rest from the feed."""
    unit = subscription.unit_code
    # Far behind: pages without joining, so that the queue does not fill meanwhile.
    while subscription.ended is None and subscription.position - after > _BATCH:
        upto = subscription.position
        rows = await read_page(sessions, after=after, upto=upto, unit_code=unit)
        if rows:
            yield b"".join(encode(row) for row in rows)
        after = rows[-1].id if len(rows) == _BATCH else upto
    # At most `_BATCH` ids left below the feed's position: one page covers them.
    joined = subscription.join(after)
    if after < joined:
        rows = await read_page(sessions, after=after, upto=joined, unit_code=unit)
        if rows:
            yield b"".join(encode(row) for row in rows)


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` of byte chunks, closed as soon as the client hangs up.

    The chunks' generator is closed on every way out (Starlette leaves one stuck in a
    send to the garbage collector), so a stream's subscription ends with it."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(chunks, headers=headers)
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
            async with contextlib.aclosing(self._chunks) as chunks:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
