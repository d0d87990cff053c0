"""Bulk work never holds the event loop: ledgers stream in constant memory, XLSX is built
in a worker thread, heavy requests are limited per key and role, and the loop's lag is
measured."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from openpyxl import load_workbook
from prometheus_client import CollectorRegistry, generate_latest

from api.app import Readiness, create_app
from api.heavy import Busy, HeavyLimiter, HeavyLimits
from api.keys import ApiKey, authenticate
from api.models import Role
from core import db
from core.census import import_census, read_census
from core.looplag import LoopLag
from tests.db_fixtures import BACKENDS, fresh_database_url, migrated_sessions
from tests.test_api_harness import ADMIN_KEY, make_keys, seed_registry, serve

pytestmark = pytest.mark.asyncio

# A registry large enough that holding it whole would show: 20,000 covers (half WATER's,
# half DRAIN's), besides the harness's three.
BULK = 20_000
SEEDED = 3
HEADER = (
    "cover_id,kind_code,owner_unit,maintainer_unit,road,grid,lon,lat,depth_cm,material,"
    "installed_on,flood_prone,anti_fall,state,device_id,report_interval_s"
)


def census_file(count: int) -> bytes:
    lines = [HEADER]
    for n in range(count):
        kind, owner = ("01", "WATER") if n % 2 else ("03", "DRAIN")
        number = f"41120301{kind}{n + 100_000:06d}"
        lines.append(
            f"{number},01{kind},{owner},,Jiefang Road {n % 50},G{n % 7},112.45,34.62,180,"
            "cast iron,2024-05-01,false,true,in_service,,"
        )
    return "\n".join(lines).encode()


@dataclass
class BulkApi:
    url: str
    keys: dict[str, str]
    limiter: HeavyLimiter
    app: FastAPI

    async def key(self, who: str) -> ApiKey:
        async with db.transaction(self.app.state.context.sessions, write=False) as session:
            key = await authenticate(session=session, key=self.keys[who], admin_key=ADMIN_KEY)
        assert key is not None
        return key

    async def released(self, who: str) -> bool:
        """Whether `who`'s places are all free, once the server has finished its answers
        (it lets go of a place just after the last byte is sent)."""
        key = await self.key(who)
        for _ in range(500):
            if self.limiter.running(key) == 0:
                return True
            await asyncio.sleep(0.01)
        return False


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "bulk_requests")


@pytest_asyncio.fixture
async def bulk(database_url: str) -> AsyncIterator[BulkApi]:
    async with migrated_sessions(database_url) as sessions:
        await seed_registry(sessions)
        async with db.transaction(sessions) as session:
            report = await import_census(session=session, table=read_census(census_file(BULK)))
        assert (report.inserted, report.errors) == (BULK, []), report
        keys, _ = await make_keys(sessions)
        app = create_app(
            registry=CollectorRegistry(),
            readiness=lambda: Readiness({"database": None}),
            sessions=sessions,
            admin_key=ADMIN_KEY,
            heavy_limits=HeavyLimits(per_key=2, per_role=dict.fromkeys(Role, 3)),
        )
        async with serve(app) as url:
            yield BulkApi(url, keys, app.state.heavy, app)


def client(api: BulkApi, who: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api.keys[who]}"}
    return httpx.AsyncClient(base_url=api.url, headers=headers, timeout=120)


@dataclass
class Download:
    chunks: list[int]  # their sizes, in the order they came
    lines: int
    peak: int  # the most memory the process (server and client) held above the start

    @property
    def size(self) -> int:
        return sum(self.chunks)


async def download(viewer: httpx.AsyncClient, **params: str) -> Download:
    """A census CSV read as it comes, with the memory held meanwhile."""
    got = Download([], 0, 0)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        async with viewer.stream("GET", "/api/v1/ledgers/census", params=params) as answer:
            assert answer.status_code == 200
            assert "content-length" not in answer.headers  # sent as it is read
            async for chunk in answer.aiter_raw():
                got.chunks.append(len(chunk))
                got.lines += chunk.count(b"\r\n")
        got.peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    return got


async def test_census_csv_streams_in_constant_memory(bulk: BulkApi) -> None:
    async with client(bulk, "viewer") as viewer:
        # Once first, so that what is made once (compiled queries, the client's TLS
        # context) is not counted.
        assert (await viewer.get("/api/v1/ledgers/census", params={"unit": "X"})).is_success
        half = await download(viewer, lang="en", unit="DRAIN")
        whole = await download(viewer, lang="en")
    assert (half.lines, whole.lines) == (1 + BULK // 2 + 2, 1 + SEEDED + BULK)
    # The first bytes come long before the whole body.
    assert len(whole.chunks) > 10
    assert whole.chunks[0] < whole.size / 10
    # Twice the rows, not more memory: a partition of rows at a time, never the list of
    # covers or the whole file (which held several times the body's size).
    assert whole.peak < 1.25 * half.peak, (half.peak, whole.peak)
    assert whole.peak < whole.size, (whole.peak, whole.size)
    # The place the download took is given back once it is sent.
    assert await bulk.released("viewer")


async def test_unit_filter_gives_only_that_units_rows(bulk: BulkApi) -> None:
    async with client(bulk, "viewer") as viewer:
        answer = await viewer.get("/api/v1/ledgers/census", params={"unit": "DRAIN"})
    assert answer.status_code == 200
    assert "census-DRAIN.csv" in answer.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(answer.content.decode("utf-8-sig"))))
    assert rows[0][:3] == ["编号", "类别代码", "权属单位"]
    assert {row[2] for row in rows[1:]} == {"DRAIN"}
    assert len(rows) - 1 == BULK // 2 + 2  # the harness's two DRAIN covers
    assert [row[0] for row in rows[1:]] == sorted(row[0] for row in rows[1:])


async def test_xlsx_is_built_in_a_worker_thread(
    bulk: BulkApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="api.ledgers")
    async with client(bulk, "viewer") as viewer:
        answer = await viewer.get("/api/v1/ledgers/census", params={"format": "xlsx"})
    assert answer.status_code == 200
    book = load_workbook(io.BytesIO(answer.content), read_only=True)
    assert book.sheetnames == ["井盖", "单位", "设备"]
    assert sum(1 for _ in book["井盖"].iter_rows(values_only=True)) == 1 + SEEDED + BULK
    written = [r for r in caplog.records if r.getMessage().startswith("ledger workbook written")]
    assert len(written) == 1
    # Not on the event loop's thread (this test's), which also runs ingest and alerting.
    assert written[0].thread != threading.get_ident()


async def test_a_third_heavy_request_of_a_key_waits_its_turn(bulk: BulkApi) -> None:
    dispatcher = await bulk.key("dispatcher")
    async with client(bulk, "dispatcher") as mine, client(bulk, "admin") as other:
        small = {"unit": "WATER", "format": "xlsx"}
        with bulk.limiter.slot(dispatcher), bulk.limiter.slot(dispatcher):  # two running
            third = await mine.get("/api/v1/ledgers/problems", params=small)
            assert third.status_code == 429
            assert third.headers["retry-after"] == "5"
            assert (third.json()["status"], third.json()["code"]) == (429, "too_many_requests")
            # Another key is not held up by this one's downloads.
            assert (await other.get("/api/v1/ledgers/problems", params=small)).status_code == 200
        assert (await mine.get("/api/v1/ledgers/problems", params=small)).status_code == 200
        assert await bulk.released("dispatcher")


async def test_role_total_limits_keys_of_one_role() -> None:
    def key(id: int, role: Role) -> ApiKey:
        return ApiKey(id=id, name=f"k{id}", role=role, unit_code=None, prefix="x", created_at=None)

    limiter = HeavyLimiter(HeavyLimits(per_key=2, per_role={Role.VIEWER: 3, Role.ADMIN: 4}))
    with limiter.slot(key(1, Role.VIEWER)), limiter.slot(key(1, Role.VIEWER)):
        with limiter.slot(key(2, Role.VIEWER)):
            with pytest.raises(Busy) as busy:
                limiter.slot(key(3, Role.VIEWER)).__enter__()
            assert busy.value.retry_after_s == 5
            with limiter.slot(key(4, Role.ADMIN)):  # other roles have their own total
                assert limiter.running(key(4, Role.ADMIN)) == 1
        with limiter.slot(key(3, Role.VIEWER)):  # a place came free
            assert limiter.running(key(3, Role.VIEWER)) == 1


async def test_loop_lag_warns_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, warn_s=0.1, warn_every_s=10.0)
    # (lag, loop time): a short lag, a stall, two more within 10 s, one 10 s later.
    for lag_s, now in ((0.02, 1.0), (0.3, 2.0), (0.2, 3.0), (0.15, 11.9), (0.12, 12.0)):
        lag.observe(lag_s, now)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("event loop stalled for 300 ms")
    assert warnings[1].startswith("event loop stalled for 120 ms")
    assert "; 2 more" in warnings[1]
    assert lag.worst_s == 0.3
    assert registry.get_sample_value("smartcover_event_loop_lag_seconds_count") == 5
    assert registry.get_sample_value("smartcover_event_loop_lag_seconds_bucket", {"le": "0.1"}) == 1
    assert b"smartcover_event_loop_lag_last_seconds 0.12" in generate_latest(registry)


async def test_loop_lag_sees_a_blocked_loop(caplog: pytest.LogCaptureFixture) -> None:
    lag = LoopLag(CollectorRegistry(), tick_s=0.01)
    async with asyncio.TaskGroup() as group:
        watching = group.create_task(lag.run())
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # noqa: ASYNC251 -- on purpose: what CPU-bound work on the loop does
        await asyncio.sleep(0.05)
        watching.cancel()
    assert lag.worst_s >= 0.1
    assert any(r.getMessage().startswith("event loop stalled") for r in caplog.records)
