"""Limits before work, on the API served by uvicorn: bodies refused before they are read
(too large, or without a valid key), chunked bodies cut off, per-key rate and streams."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.app import Readiness, create_app
from api.limits import ApiLimits, api_limits
from api.stream import OutboxSignal, StreamConfig
from core.settings import Settings
from tests.db_fixtures import BACKENDS, fresh_database_url, migrated_sessions
from tests.test_api_harness import ADMIN_KEY, EMPTY, make_keys, seed_registry, serve

pytestmark = pytest.mark.asyncio

MIB = 1024 * 1024
UNIT = {"code": "NEW-1", "name": "A new unit", "kind": "gas"}
# Seconds to wait for an answer that must come without the rest of the body: a hang
# fails the test instead of stalling it (no timing is asserted).
ANSWER_TIMEOUT_S = 10


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_limits")


@dataclass
class LimitedApi:
    url: str
    keys: dict[str, str]
    revoked_key: str

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


@contextlib.asynccontextmanager
async def limited_api(database_url: str, limits: ApiLimits | None) -> AsyncIterator[LimitedApi]:
    async with migrated_sessions(database_url) as sessions:
        await seed_registry(sessions)
        keys, revoked = await make_keys(sessions)
        signal = OutboxSignal()
        app = create_app(
            registry=CollectorRegistry(),
            readiness=lambda: Readiness({"database": None}),
            sessions=sessions,
            readings=EMPTY,
            admin_key=ADMIN_KEY,
            outbox_signal=signal,
            stream_config=StreamConfig(poll_s=0.05, keepalive_s=0.5),
            limits=limits,
        )
        async with serve(app) as url:
            yield LimitedApi(url, keys, revoked)
            signal.close()  # ends open streams, so that uvicorn can stop


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


async def raw_post(url: str, path: str, headers: dict[str, str], first_bytes: bytes) -> RawAnswer:
    """Sends a request's head and only the first bytes of its body; reads the answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + first_bytes)
    await writer.drain()
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            status = int((await reader.readline()).split()[1])
            answer: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                answer[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(answer["content-length"]))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return RawAnswer(status, answer, json.loads(body))


async def test_a_body_over_its_routes_limit_is_refused_before_it_is_read(
    database_url: str,
) -> None:
    async with limited_api(database_url, None) as api:
        json_head = {**api.headers("admin"), "Content-Type": "application/json"}
        unit = await raw_post(
            api.url, "/api/v1/units", {**json_head, "Content-Length": str(200 * MIB)}, b'{"code"'
        )
        census = await raw_post(
            api.url,
            "/api/v1/covers/import",
            {**api.headers("admin"), "Content-Type": "text/csv", "Content-Length": str(40 * MIB)},
            b"cover_id,",
        )
    assert unit.status == 413
    assert unit.body["code"] == "too_large"
    assert "64 KiB" in unit.body["message"]
    assert unit.headers["connection"] == "close"
    assert unit.headers["x-content-type-options"] == "nosniff"
    assert census.status == 413
    assert "32 MiB" in census.body["message"]


async def test_a_body_without_a_valid_key_is_refused_before_it_is_read(
    database_url: str,
) -> None:
    length = {"Content-Type": "application/json", "Content-Length": "60000"}
    async with limited_api(database_url, None) as api:
        answers = [
            await raw_post(api.url, "/api/v1/units", {**length, **auth}, b'{"code"')
            for auth in (
                {},
                {"Authorization": "Bearer sck_not-a-key"},
                {"Authorization": f"Bearer {api.revoked_key}"},
                {"Authorization": f"Basic {ADMIN_KEY}"},
            )
        ]
        async with httpx.AsyncClient(base_url=api.url) as client:
            created = await client.post("/api/v1/units", json=UNIT, headers=api.headers("admin"))
            by_bootstrap = await client.post(
                "/api/v1/units",
                json={**UNIT, "code": "NEW-2"},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
    assert [answer.status for answer in answers] == [401, 401, 401, 401]
    assert {answer.body["code"] for answer in answers} == {"unauthenticated"}
    assert answers[0].headers["www-authenticate"] == "Bearer"
    assert created.status_code == 201
    assert by_bootstrap.status_code == 201


async def chunks(total: int, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    """A body of `total` bytes sent chunked: no Content-Length to refuse it by."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


async def test_a_chunked_body_over_the_limit_is_cut_off(database_url: str) -> None:
    async with (
        limited_api(database_url, None) as api,
        httpx.AsyncClient(base_url=api.url) as client,
    ):
        json_post = await client.post(
            "/api/v1/units",
            content=chunks(200 * 1024),
            headers={**api.headers("admin"), "Content-Type": "application/json"},
        )
        # The census import's limit is its own: a larger file reaches the parser.
        census_post = await client.post(
            "/api/v1/covers/import",
            content=chunks(200 * 1024),
            headers={**api.headers("admin"), "Content-Type": "text/csv"},
        )
        unauthenticated = await client.post(
            "/api/v1/units", content=chunks(1024), headers={"Content-Type": "application/json"}
        )
    assert json_post.status_code == 413
    assert json_post.json()["code"] == "too_large"
    assert json_post.headers["connection"] == "close"
    assert census_post.status_code == 422
    assert unauthenticated.status_code == 401


async def test_a_key_over_its_rate_gets_429_with_retry_after(database_url: str) -> None:
    # A token every ten seconds: the test's requests come far faster than that.
    limits = ApiLimits(rate_per_s=0.1, rate_burst=3)
    async with (
        limited_api(database_url, limits) as api,
        httpx.AsyncClient(base_url=api.url) as client,
    ):
        viewer = [
            await client.get("/api/v1/units", headers=api.headers("viewer")) for _ in range(4)
        ]
        other_key = await client.get("/api/v1/units", headers=api.headers("crew"))
        posted = await client.post("/api/v1/units", json=UNIT, headers=api.headers("viewer"))
    assert [answer.status_code for answer in viewer] == [200, 200, 200, 429]
    refused = viewer[-1]
    assert refused.json()["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert other_key.status_code == 200  # each key has its own bucket
    assert posted.status_code == 429


async def open_stream(
    stack: contextlib.AsyncExitStack, client: httpx.AsyncClient, headers: dict[str, str]
) -> httpx.Response:
    return await stack.enter_async_context(client.stream("GET", "/api/v1/stream", headers=headers))


async def test_a_sixth_stream_of_one_key_gets_429(database_url: str) -> None:
    limits = ApiLimits(streams_per_key=5)
    async with (
        limited_api(database_url, limits) as api,
        httpx.AsyncClient(base_url=api.url, timeout=ANSWER_TIMEOUT_S) as client,
    ):
        viewer = api.headers("viewer")
        async with contextlib.AsyncExitStack() as five:
            opened = [await open_stream(five, client, viewer) for _ in range(5)]
            sixth = await stream_refusal(client, viewer)
            async with contextlib.AsyncExitStack() as others:
                crew = await open_stream(others, client, api.headers("crew"))
        again = await reopened_once_released(client, viewer)
    assert [response.status_code for response in opened] == [200] * 5
    assert sixth is not None
    assert sixth.status_code == 429
    assert sixth.json()["code"] == "too_many_streams"
    assert int(sixth.headers["retry-after"]) > 0
    assert crew.status_code == 200
    assert again == 200


async def stream_refusal(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> httpx.Response | None:
    """The answer to opening a stream when it is refused; None when it opens."""
    async with client.stream("GET", "/api/v1/stream", headers=headers) as response:
        if response.status_code == 200:
            return None
        await response.aread()
        return response


async def reopened_once_released(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    """The status of a stream opened once the server has seen the five end."""
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        while True:
            async with client.stream("GET", "/api/v1/stream", headers=headers) as response:
                if response.status_code != 429:
                    return response.status_code
            await asyncio.sleep(0.05)


async def test_the_default_limits_admit_a_dashboards_load(database_url: str) -> None:
    # The dashboard loads a view with a burst of requests and keeps one stream open.
    async with (
        limited_api(database_url, api_limits(Settings.model_validate({}))) as api,
        httpx.AsyncClient(base_url=api.url, timeout=ANSWER_TIMEOUT_S) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        viewer = api.headers("viewer")
        stream = await open_stream(stack, client, viewer)
        paths = ["/api/v1/units", "/api/v1/covers", "/api/v1/cases", "/api/v1/stats/units"]
        burst = await asyncio.gather(
            *(client.get(paths[n % len(paths)], headers=viewer) for n in range(90))
        )
    assert stream.status_code == 200
    assert {answer.status_code for answer in burst} == {200}


async def test_the_schema_states_the_limits() -> None:
    app = create_app(
        registry=CollectorRegistry(),
        readiness=lambda: Readiness({}),
        sessions=async_sessionmaker(),
    )
    paths = app.openapi()["paths"]

    assert {"413", "429"} <= set(paths["/api/v1/units"]["post"]["responses"])
    assert "429" in paths["/api/v1/stream"]["get"]["responses"]
    assert "413" not in paths["/api/v1/stream"]["get"]["responses"]
    assert "429" not in paths["/healthz"]["get"]["responses"]
