"""A method a path does not take: 405, with `Allow` naming every method it does take
(paths served by several routes included) and the API's error body."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.test_api_harness import WATER_COVER, RunningApi, running_api

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def api(tmp_path: Path) -> AsyncIterator[RunningApi]:
    # Routing does not touch the database: SQLite is enough.
    async with running_api(f"sqlite:///{tmp_path / 'methods.db'}") as running:
        yield running


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/units", "GET, POST"),  # two routes: list and create
        ("PUT", "/api/v1/units/WATER", "GET, PATCH"),
        ("DELETE", f"/api/v1/covers/{WATER_COVER}", "GET, PATCH"),
        ("POST", "/api/v1/devices/dev-1/binding", "DELETE, PUT"),
        ("GET", "/api/v1/cases/1/transitions", "POST"),
        ("PATCH", "/api/v1/covers/import", "POST"),  # not a cover number's path
        ("OPTIONS", "/api/v1/stats/units", "GET"),
        ("POST", "/healthz", "GET"),
        ("POST", "/docs/assets/swagger-ui.css", "GET, HEAD"),  # a mount's own answer
        ("DELETE", "/dashboard/favicon.svg", "GET, HEAD"),
    ],
)
async def test_405_names_every_allowed_method(
    api: RunningApi, method: str, path: str, allowed: str
) -> None:
    answer = await api.client("admin").request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allowed
    assert answer.json()["code"] == "method_not_allowed"
    assert answer.headers["x-content-type-options"] == "nosniff"


async def test_allowed_methods_are_answered(api: RunningApi) -> None:
    # What Allow names for /api/v1/units is really taken there.
    admin = api.client("admin")
    assert (await admin.get("/api/v1/units")).status_code == 200
    created = await admin.post("/api/v1/units", json={"code": "U1", "name": "U", "kind": "other"})
    assert created.status_code == 201
