"""Many live-stream clients share one outbox feed: the same events in order for all, the
database queried as often for two hundred clients as for one, resumption across the
catch-up/live boundary exact, a client that stops reading cut off alone.

Clients here are bare sockets speaking HTTP/1.1, light enough to open by the hundred, and
able to stop reading (a slow client) while the server keeps writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import delete, event, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from alerting.models import DeliveryRow, OutboxRow
from alerting.outbox import MQTT_CHANNEL, enqueue
from api.stream import StreamConfig
from core import db
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import RunningApi, running_api

READ_TIMEOUT_S = 30.0  # a guard against a hang, not a measurement
MANY = 200


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "stream_shared")


class RawStream:
    """One SSE client on a bare socket: it reads only when asked to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._text = ""
        self.ended = False
        self.last_id: int | None = None

    @classmethod
    async def open(
        cls, api: RunningApi, who: str, *, last_id: int | None = None, rcvbuf: int = 0
    ) -> RawStream:
        host, port = _address(api.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # a small window: the server's writes back up soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        resume = "" if last_id is None else f"Last-Event-ID: {last_id}\r\n"
        writer.write(
            f"GET /api/v1/stream HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {api.keys[who]}\r\n{resume}\r\n".encode()
        )
        stream = cls(reader, writer)
        await stream._headers()
        return stream

    async def _headers(self) -> None:
        status = await self._reader.readline()
        assert status.split()[1] == b"200", status
        headers = (await self._reader.readuntil(b"\r\n\r\n")).lower()
        assert b"content-type: text/event-stream" in headers
        assert b"transfer-encoding: chunked" in headers

    async def _chunk(self) -> bool:
        size = int((await self._reader.readline()).strip(), 16)
        if size == 0:
            await self._reader.readline()
            return False
        self._text += (await self._reader.readexactly(size + 2))[:-2].decode()
        return True

    async def next(self) -> dict[str, Any] | None:
        """The next event or comment ({"id", "event", "data"} or {"comment", ...}); None
        once the server has ended the stream."""
        while "\n\n" not in self._text:
            if self.ended or not await self._chunk():
                self.ended = True
                return None
        block, self._text = self._text.split("\n\n", 1)
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            fields["comment" if name == "" else name] = (
                json.loads(value) if name == "data" else value
            )
        if "id" in fields:
            self.last_id = int(fields["id"])
        return fields

    async def ids_until(self, last: int) -> list[int]:
        """Ids of the events read until (and with) `last`."""
        ids: list[int] = []
        async with asyncio.timeout(READ_TIMEOUT_S):
            while not ids or ids[-1] < last:
                item = await self.next()
                assert item is not None, f"the stream ended after {ids[-3:]}"
                if "event" in item:
                    ids.append(int(item["id"]))
        return ids

    async def rest(self) -> list[dict[str, Any]]:
        """Everything until the server ends the stream."""
        items: list[dict[str, Any]] = []
        async with asyncio.timeout(READ_TIMEOUT_S):
            while (item := await self.next()) is not None:
                items.append(item)
        return items

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


@contextlib.asynccontextmanager
async def clients(
    api: RunningApi, count: int, who: str = "viewer", **options: Any
) -> AsyncIterator[list[RawStream]]:
    """`count` open streams, each past its opening message."""
    streams = list(
        await asyncio.gather(*(RawStream.open(api, who, **options) for _ in range(count)))
    )
    try:
        for stream in streams:
            opening = await stream.next()
            assert opening is not None
            assert "comment" in opening
        yield streams
    finally:
        await asyncio.gather(*(stream.close() for stream in streams))


async def write_events(
    api: RunningApi, count: int, *, unit: str = "WATER", pad: int = 0, notify: bool = True
) -> list[int]:
    """`count` outbox events in one transaction (as the engine writes them); their ids."""
    async with db.transaction(api.sessions) as session:
        rows = [
            await enqueue(
                session,
                type="test.event",
                unit_code=unit,
                occurred_ms=n,
                payload={"n": n, "pad": "x" * pad},
                channels=(MQTT_CHANNEL,),
            )
            for n in range(count)
        ]
    if notify:
        api.signal.notify()
    return [row.id for row in rows]


async def outbox_ids(api: RunningApi, *, after: int = 0) -> list[int]:
    async with db.transaction(api.sessions, write=False) as session:
        query = select(OutboxRow.id).where(OutboxRow.id > after).order_by(OutboxRow.id)
        return list(await session.scalars(query))


@contextlib.contextmanager
def outbox_reads(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SELECT on the outbox the engine runs meanwhile (an observation: statements
    are counted as they go to the database, nothing is replaced)."""
    seen: list[str] = []

    def before(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM outbox" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


def engine_of(api: RunningApi) -> AsyncEngine:
    bind = api.sessions.kw["bind"]
    assert isinstance(bind, AsyncEngine)
    return bind


@pytest.mark.asyncio
async def test_many_clients_get_the_same_events_in_order(database_url: str) -> None:
    async with (
        running_api(database_url) as api,
        clients(api, MANY) as viewers,
        clients(api, 5, who="crew") as crews,  # WATER's crew
    ):
        await api.strike("dev-1")  # the engine writes three events, and notifies
        await api.strike("dev-2")  # DRAIN's
        await write_events(api, 40)
        await write_events(api, 40, unit="DRAIN")
        written = await outbox_ids(api)
        received = await asyncio.gather(*(v.ids_until(written[-1]) for v in viewers))
        async with db.transaction(api.sessions, write=False) as session:
            query = select(OutboxRow.id).where(OutboxRow.unit_code == "WATER")
            water = list(await session.scalars(query.order_by(OutboxRow.id)))
        for_crews = await asyncio.gather(*(c.ids_until(water[-1]) for c in crews))
    assert len(written) == 3 + 3 + 80
    assert all(ids == written for ids in received)
    assert all(ids == water for ids in for_crews)


@pytest.mark.asyncio
async def test_outbox_queries_do_not_grow_with_the_number_of_clients(database_url: str) -> None:
    # No polling: the feed reads when notified, once per round here, however many listen.
    notified_only = StreamConfig(poll_s=3600.0, keepalive_s=3600.0)
    rounds = 5
    async with running_api(database_url, stream=notified_only) as api:
        reads: list[int] = []
        async with clients(api, 1) as one:
            for count in (1, MANY - 1):
                async with clients(api, count) as more:
                    listening = [*one, *more]
                    with outbox_reads(engine_of(api)) as seen:
                        for _ in range(rounds):
                            (last,) = await write_events(api, 1)
                            await asyncio.gather(*(c.ids_until(last) for c in listening))
                    reads.append(len(seen))
    assert reads == [rounds, rounds]  # one read per round, for 1 client and for 200


@pytest.mark.asyncio
async def test_resumption_across_catch_up_and_live_has_no_gap_and_no_duplicate(
    database_url: str,
) -> None:
    async with running_api(database_url) as api, clients(api, 1) as (watcher,):
        backlog = await write_events(api, 450)  # more than two pages to catch up
        resumers: list[tuple[int, RawStream]] = []
        for n in range(30):  # events keep coming while clients resume at various points
            await write_events(api, 5)
            after = backlog[(n * 37) % len(backlog)] if n % 3 else 0
            resumers.append((after, await RawStream.open(api, "viewer", last_id=after)))
        last = (await outbox_ids(api))[-1]
        await watcher.ids_until(last)
        for after, stream in resumers:
            opening = await stream.next()
            assert opening is not None
            assert opening["id"] == str(after)
            assert await stream.ids_until(last) == await outbox_ids(api, after=after)
            await stream.close()


@pytest.mark.asyncio
async def test_resume_points_ahead_of_the_feed_or_older_than_every_kept_row(
    database_url: str,
) -> None:
    async with running_api(database_url) as api:
        ids = await write_events(api, 3)
        async with clients(api, 1, last_id=ids[-1] + 1000) as (ahead,):
            # Ahead of the feed (an id another process gave): nothing twice, the rest live.
            later = await write_events(api, 1002)
            assert await ahead.ids_until(later[-1]) == later[1000:]
        await prune(api, ids[:2])
        # From a pruned id: the oldest kept row first, then every page after it.
        async with clients(api, 1, last_id=ids[0]) as (old,):
            assert await old.ids_until(later[-1]) == [ids[2], *later]


async def prune(api: RunningApi, ids: list[int]) -> None:
    """Deletes delivered outbox rows, as the service's pruning does."""
    async with db.transaction(api.sessions) as session:
        await session.execute(delete(DeliveryRow).where(DeliveryRow.outbox_id.in_(ids)))
        await session.execute(delete(OutboxRow).where(OutboxRow.id.in_(ids)))


@pytest.mark.asyncio
async def test_a_client_that_stops_reading_is_cut_off_alone(database_url: str) -> None:
    small_queue = StreamConfig(poll_s=0.05, keepalive_s=3600.0, queue_events=5)
    async with (
        running_api(database_url, stream=small_queue) as api,
        clients(api, 3) as readers,
        clients(api, 1, rcvbuf=4096) as (stalled,),
    ):
        written: list[int] = []
        # One event at a time, each read by the readers: their queues never hold more
        # than one. The stalled client's socket, then its queue, fill up until it is cut
        # (300 × 32 kB is twice what Linux's default socket buffers can hold).
        for _ in range(300):
            written += await write_events(api, 1, pad=32_000)
            for reader in readers:
                assert await reader.ids_until(written[-1]) == written[-1:]
        got = await stalled.rest()
        resumed_from = stalled.last_id
        async with clients(api, 1, last_id=resumed_from) as (again,):
            rest = await again.ids_until(written[-1])
    events = [int(item["id"]) for item in got if "event" in item]
    assert events == written[: len(events)]  # in order, nothing missing before the cut
    assert len(events) < len(written)
    assert got[-1]["comment"].startswith("stream closed: too slow: more than 5 events behind")
    assert events[-1] == resumed_from
    assert rest == written[len(events) :]  # resumed exactly where it was cut
