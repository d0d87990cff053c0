"""The live stream: outbox events as SSE, resumed exactly by Last-Event-ID, a crew's own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from alerting.models import OutboxRow
from alerting.outbox import MQTT_CHANNEL, enqueue
from api.stream import OutboxCursor, StreamConfig
from core import db
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import HOLDERS, WATER_COVER, RunningApi, running_api

READ_TIMEOUT_S = 10.0


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_stream")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


class Events:
    """Server-sent events read from one open stream, one at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> dict[str, Any]:
        """The next event or comment: {"id", "event", "data"} or {"comment"}."""
        async with asyncio.timeout(READ_TIMEOUT_S):
            fields: dict[str, Any] = {}
            async for line in self._lines:
                if line == "":
                    if fields:
                        return fields
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    fields["comment"] = value
                elif name == "data":
                    fields["data"] = json.loads(value)
                else:
                    fields[name] = value
        raise AssertionError("the stream ended")

    async def events(self, count: int) -> list[dict[str, Any]]:
        """The next `count` events, skipping comments."""
        found: list[dict[str, Any]] = []
        while len(found) < count:
            item = await self.next()
            if "comment" not in item:
                found.append(item)
        return found


@asynccontextmanager
async def stream(api: RunningApi, who: str, last_id: int | None = None) -> AsyncIterator[Events]:
    headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
    async with api.client(who).stream("GET", "/api/v1/stream", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = Events(response)
        first = await events.next()  # a comment saying where the stream starts, and `retry`
        assert "comment" in first
        yield events


async def outbox_ids(api: RunningApi, unit: str | None = None) -> list[int]:
    async with db.transaction(api.sessions, write=False) as session:
        query = select(OutboxRow.id).order_by(OutboxRow.id)
        if unit is not None:
            query = query.where(OutboxRow.unit_code == unit)
        return list(await session.scalars(query))


@pytest.mark.asyncio
async def test_an_alert_reaches_the_stream_and_resume_is_exact(api: RunningApi) -> None:
    async with stream(api, "viewer") as live:
        case_id = await api.strike("dev-1")  # the engine commits, and notifies the stream
        opened, dispatched, raised = await live.events(3)  # in the outbox's order
    assert [e["event"] for e in (opened, dispatched, raised)] == [
        "case.opened",
        "case.changed",
        "alert.raised",
    ]
    assert raised["data"]["alert"]["cover_id"] == WATER_COVER
    assert raised["data"]["unit_code"] == "WATER"
    assert {"event_id", "type", "occurred_ms"} <= set(raised["data"])
    assert dispatched["data"]["case"]["id"] == case_id
    assert [int(e["id"]) for e in (opened, dispatched, raised)] == await outbox_ids(api)
    # Hang up after the first event; events written meanwhile come on reconnection.
    moved = await api.client("crew").post(
        f"/api/v1/cases/{case_id}/transitions", json={"to": "acknowledged", "note": "coming"}
    )
    assert moved.status_code == 200
    async with stream(api, "viewer", last_id=int(opened["id"])) as again:
        resumed = await again.events(3)
    assert [int(e["id"]) for e in resumed] == (await outbox_ids(api))[1:]
    assert [e["event"] for e in resumed] == ["case.changed", "alert.raised", "case.changed"]
    assert resumed[2]["data"]["actor"] == HOLDERS["crew"]
    assert resumed[2]["data"]["to"] == "acknowledged"


@pytest.mark.asyncio
async def test_a_crew_gets_only_its_units_events(api: RunningApi) -> None:
    await api.strike("dev-2")  # DRAIN's
    await api.strike("dev-1")  # WATER's
    async with stream(api, "crew", last_id=0) as crew:
        events = await crew.events(3)
        assert {e["data"]["unit_code"] for e in events} == {"WATER"}
        assert [int(e["id"]) for e in events] == await outbox_ids(api, "WATER")
        await api.strike("dev-3")  # DRAIN's again: not for this crew
        assert (await crew.next()).get("comment") == "keep-alive"  # nothing but keep-alive


@pytest.mark.asyncio
async def test_a_bad_last_event_id_is_refused(api: RunningApi) -> None:
    answer = await api.client("viewer").get("/api/v1/stream", headers={"Last-Event-ID": "twelve"})
    assert (answer.status_code, answer.json()["code"]) == (400, "bad_event_id")


@pytest.mark.asyncio
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_an_id_committed_late_is_not_overtaken(database_url: str) -> None:
    # PostgreSQL hands out ids at insert time: id N+1 can commit before id N.
    grace = StreamConfig(poll_s=0.05, keepalive_s=30.0, gap_grace_s=30.0)
    async with running_api(database_url, stream=grace) as api, stream(api, "viewer") as live:
        async with db.transaction(api.sessions) as slow:
            first = await enqueue(
                slow, type="test.slow", unit_code="WATER", occurred_ms=1, payload={},
                channels=(MQTT_CHANNEL,),
            )  # fmt: skip
            async with db.transaction(api.sessions) as fast:
                second = await enqueue(
                    fast, type="test.fast", unit_code="WATER", occurred_ms=2, payload={},
                    channels=(MQTT_CHANNEL,),
                )  # fmt: skip
            assert second.id > first.id
            await asyncio.sleep(0.3)  # several polls see the second one alone
        events = await live.events(2)
    assert [(e["id"], e["event"]) for e in events] == [
        (str(first.id), "test.slow"),
        (str(second.id), "test.fast"),
    ]


def test_cursor_waits_for_a_gap_then_skips_it() -> None:
    cursor = OutboxCursor(last_id=10, gap_grace_s=5.0)
    assert cursor.take([11, 12, 14, 15], now=100.0) == 2  # 13 is missing
    assert cursor.last_id == 12
    assert cursor.take([14, 15], now=103.0) == 0  # still within the grace
    assert cursor.take([13, 14, 15], now=104.0) == 3  # 13 committed late: all in order
    assert cursor.last_id == 15
    assert cursor.take([17], now=110.0) == 0
    assert cursor.take([17, 18], now=115.1) == 2  # 16 never came: rolled back, skipped
    assert cursor.last_id == 18
    assert cursor.take([], now=200.0) == 0
