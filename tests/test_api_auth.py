"""Who may do what: the role-by-endpoint matrix, keys and their CLI, the bootstrap key."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import select

from api.models import ApiKeyRow
from core import db
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import DRAIN_COVER, WATER_COVER, RunningApi, running_api

# Who calls: no key, keys that are not valid, and one valid key per role.
ANONYMOUS = ("none", "garbage", "basic", "revoked")
ROLES = ("viewer", "crew", "dispatcher", "admin", "bootstrap")
RANK = {"viewer": 0, "crew": 1, "dispatcher": 2, "admin": 3, "bootstrap": 3}

pytestmark = pytest.mark.asyncio


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database_url(request, tmp_path, "api_auth")


@pytest_asyncio.fixture
async def api(database_url: str) -> AsyncIterator[RunningApi]:
    async with running_api(database_url) as running:
        yield running


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    needs: str | None  # the lowest role allowed, None for a public endpoint
    ok: int  # the answer to an allowed caller
    body: Callable[[str], dict[str, Any]] | None = None
    content: bytes | None = None


def census_csv(who: str) -> bytes:
    number = 10 + ROLES.index(who) if who in ROLES else 99
    return (
        "cover_id,kind_code,owner_unit,road,lon,lat\n"
        f"41120301050000{number},0105,WATER,Zhongzhou Road,112.4,34.6\n"
    ).encode()


def endpoints(case_id: int) -> list[Endpoint]:
    transitions = f"/api/v1/cases/{case_id}/transitions"
    return [
        Endpoint("GET", "/healthz", None, 200),
        Endpoint("GET", "/readyz", None, 200),
        Endpoint("GET", "/metrics", None, 200),
        Endpoint("GET", "/openapi.json", None, 200),
        Endpoint("GET", "/docs", None, 200),
        Endpoint("GET", "/api/v1/units", "viewer", 200),
        Endpoint("GET", "/api/v1/units/WATER", "viewer", 200),
        Endpoint(
            "POST",
            "/api/v1/units",
            "admin",
            201,
            body=lambda who: {"code": f"U-{who}", "name": f"Unit {who}", "kind": "other"},
        ),
        Endpoint(
            "PATCH", "/api/v1/units/WATER", "admin", 200, body=lambda _: {"supervisor_contact": "x"}
        ),
        Endpoint("GET", "/api/v1/covers", "viewer", 200),
        Endpoint("GET", f"/api/v1/covers/{WATER_COVER}", "viewer", 200),
        Endpoint(
            "POST",
            "/api/v1/covers",
            "admin",
            201,
            body=lambda who: {
                "cover_id": f"41120301070000{10 + ROLES.index(who) if who in ROLES else 99}",
                "owner_unit": "WATER",
                "road": "Renmin Road",
                "lon": 112.45,
                "lat": 34.62,
            },
        ),
        Endpoint(
            "PATCH",
            f"/api/v1/covers/{WATER_COVER}",
            "dispatcher",
            200,
            body=lambda _: {"material": "ductile iron"},
        ),
        Endpoint(
            "PATCH",
            f"/api/v1/covers/{WATER_COVER}",
            "admin",
            200,
            body=lambda _: {"owner_unit": "WATER"},
        ),
        Endpoint("POST", "/api/v1/covers/import", "admin", 200, content=b"per caller"),
        Endpoint("GET", f"/api/v1/covers/{WATER_COVER}/readings", "viewer", 200),
        Endpoint("GET", "/api/v1/devices", "viewer", 200),
        Endpoint("GET", "/api/v1/devices/dev-1", "viewer", 200),
        Endpoint(
            "POST", "/api/v1/devices", "admin", 201, body=lambda who: {"device_id": f"new-{who}"}
        ),
        Endpoint("PATCH", "/api/v1/devices/dev-1", "admin", 200, body=lambda _: {"model": "X1"}),
        Endpoint("GET", "/api/v1/alerts", "viewer", 200),
        Endpoint("GET", "/api/v1/cases", "viewer", 200),
        Endpoint("GET", f"/api/v1/cases/{case_id}", "viewer", 200),
        # dispatched → on_site skips a step: allowed callers get the 409, not a 403.
        Endpoint("POST", transitions, "crew", 409, body=lambda _: {"to": "on_site"}),
        # Closing is a dispatcher's move: a crew is refused before the case is looked at.
        Endpoint("POST", transitions, "dispatcher", 409, body=lambda _: {"to": "closed"}),
        Endpoint("GET", "/api/v1/ledgers/census", "viewer", 200),
        Endpoint("GET", "/api/v1/ledgers/problems?format=xlsx&lang=en", "viewer", 200),
        Endpoint("GET", "/api/v1/ledgers/acceptance", "viewer", 200),
        Endpoint("GET", "/api/v1/stats/units?month=2027-01", "viewer", 200),
        Endpoint("GET", "/api/v1/stream", "viewer", 200),
        Endpoint("GET", "/api/v1/me", "viewer", 200),
        Endpoint("GET", "/api/v1/notifications", "dispatcher", 200),
    ]


def expected(endpoint: Endpoint, who: str) -> int:
    if endpoint.needs is None:
        return 200
    if who in ANONYMOUS:
        return 401
    return endpoint.ok if RANK[who] >= RANK[endpoint.needs] else 403


def headers_of(api: RunningApi, who: str) -> dict[str, str]:
    tokens = {
        "none": None,
        "garbage": "Bearer sck_not-a-key",
        "basic": "Basic dXNlcjpwYXNz",
        "revoked": f"Bearer {api.revoked_key}",
    }
    if who in tokens:
        token = tokens[who]
        return {} if token is None else {"Authorization": token}
    return {"Authorization": f"Bearer {api.keys[who]}"}


async def call(client: httpx.AsyncClient, api: RunningApi, endpoint: Endpoint, who: str) -> int:
    headers = headers_of(api, who)
    if endpoint.path == "/api/v1/stream":
        # Streams never end: the status line is the answer; then hang up.
        async with client.stream("GET", endpoint.path, headers=headers) as response:
            return response.status_code
    kwargs: dict[str, Any] = {"headers": headers}
    if endpoint.body is not None:
        kwargs["json"] = endpoint.body(who)
    if endpoint.content is not None:
        kwargs["content"] = census_csv(who)
        headers["Content-Type"] = "text/csv"
    response = await client.request(endpoint.method, endpoint.path, **kwargs)
    if response.status_code >= 400:
        body = response.json()  # every error has the one shape
        assert set(body) == {"status", "code", "message", "details"}, body
        assert body["status"] == response.status_code
    return response.status_code


async def test_role_endpoint_matrix(api: RunningApi) -> None:
    case_id = await api.strike("dev-1")  # a WATER case, dispatched
    table = endpoints(case_id)
    cells: dict[tuple[int, str, str, str], tuple[int, int]] = {}
    client = api.client()  # one client: making one costs more than a request
    for row, endpoint in enumerate(table):
        for who in (*ANONYMOUS, *ROLES):
            got = await call(client, api, endpoint, who)
            cells[(row, endpoint.method, endpoint.path, who)] = (expected(endpoint, who), got)
    wrong = {cell: result for cell, result in cells.items() if result[0] != result[1]}
    assert wrong == {}, "cells as (expected, got)"
    assert len(cells) == len(table) * 9 == 32 * 9


async def test_unauthenticated_answers_name_the_scheme(api: RunningApi) -> None:
    response = await api.client().get("/api/v1/units")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthenticated"


async def test_crew_cannot_see_or_move_another_units_case(api: RunningApi) -> None:
    drain_case = await api.strike("dev-2")
    water_case = await api.strike("dev-1")
    crew = api.client("crew")  # WATER's crew
    assert (await crew.get(f"/api/v1/cases/{drain_case}")).status_code == 404
    moved = await crew.post(f"/api/v1/cases/{drain_case}/transitions", json={"to": "acknowledged"})
    assert moved.status_code == 404
    listed = (await crew.get("/api/v1/cases")).json()["items"]
    assert [case["id"] for case in listed] == [water_case]
    assert (await crew.get("/api/v1/cases", params={"unit": "DRAIN"})).json()["items"] == []
    alerts = (await crew.get("/api/v1/alerts")).json()["items"]
    assert {alert["cover_id"] for alert in alerts} == {WATER_COVER}
    ledger = await crew.get("/api/v1/ledgers/problems", params={"unit": "DRAIN"})
    assert ledger.status_code == 403
    # The other unit's crew, and everyone above crews, see the DRAIN case.
    drain_crew = api.client("crew_drain")
    assert (await drain_crew.get(f"/api/v1/cases/{drain_case}")).json()["cover_id"] == DRAIN_COVER
    everyone = (await api.client("viewer").get("/api/v1/cases")).json()["items"]
    assert {case["id"] for case in everyone} == {drain_case, water_case}


async def test_keys_are_stored_as_hashes_only(api: RunningApi) -> None:
    async with db.transaction(api.sessions, write=False) as session:
        rows = list(await session.scalars(select(ApiKeyRow)))
    stored = {row.key_hash for row in rows}
    for who in ("viewer", "crew", "dispatcher", "admin"):
        key = api.keys[who]
        assert key.startswith("sck_")
        assert len(key) == 47
        assert hashlib.sha256(key.encode()).hexdigest() in stored
        assert all(key not in (row.key_hash, row.prefix, row.name) for row in rows)
