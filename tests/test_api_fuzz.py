"""Schemathesis over the whole API, with an admin key and with a crew key, on SQLite and
on PostgreSQL: no 5xx, every answer as the schema says (status, type, headers, body),
valid requests accepted, invalid ones refused, a method a path does not take a 405 with
`Allow`.

The database holds a few units, covers on a road, bound devices and a case of each of
two units (the crew works for one), so that requests find records as well as miss them.
The API runs in uvicorn on a thread of its own, with its own event loop and engine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.app import Readiness, create_app
from core import db
from core.contract import Reading
from tests.db_fixtures import BACKENDS, fresh_database_url
from tests.test_api_harness import (
    ADMIN_KEY,
    EMPTY,
    Clock,
    alert_engine,
    make_keys,
    seed_registry,
    serve,
)

# Rules JSON Schema cannot state (between fields, against the deployment's settings, inside
# an uploaded file): a request valid by the schema may break one, and is refused with its
# code. Each is tested where its rule lives; here they only excuse the refusal.
BEYOND_THE_SCHEMA_CODES = {
    "outbound_refused",  # a webhook's host against SMARTCOVER_OUTBOUND_ALLOW_NETS
    "reason_required",  # cancelling a case needs a note
    "bad_range",  # end after start
    "range_too_long",  # the span allowed depends on `every`
    "too_many_buckets",  # span ÷ every
    "census_file",  # what a census file holds
    "census_rejected",
}
BEYOND_THE_SCHEMA_MESSAGES = (
    "must be below",  # threshold pairs stay ordered (clear < raise)
    "only a class-14 cover",  # without owner_unit, only an ownerless cover's class
    "differs from the cover number's class",  # kind_code against cover_id
    "do not apply",  # `from` and `to` on the census ledger, a snapshot
    "does not exist",  # a unit named in a body must be in the registry
    "a cycle",  # a unit's parents never lead back to it
)


def _beyond_the_schema(response: schemathesis.Response) -> bool:
    if response.status_code not in (400, 422):
        return False
    body = response.json()
    return body.get("code") in BEYOND_THE_SCHEMA_CODES or any(
        part in body.get("message", "") for part in BEYOND_THE_SCHEMA_MESSAGES
    )


def valid_requests_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case[Any]
) -> bool | None:
    """Schemathesis's positive_data_acceptance, but for the rules above."""
    if _beyond_the_schema(response):
        return None
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result


def _mutates_the_key(case: Case[Any]) -> bool:
    data = case.meta.phase.data if case.meta is not None else None
    return any(
        mutation.parameter_location.value == "header"
        and "authorization"
        in {str(mutation.parameter).lower(), str(mutation.original_value).lower()}
        for mutation in getattr(data, "mutations", ())
    )


def invalid_requests_refused(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case[Any]
) -> bool | None:
    """Schemathesis's negative_data_rejection, but for a case made invalid by dropping or
    changing the key: each request here carries the key under test instead."""
    if _mutates_the_key(case):
        return None
    result: bool | None = negative_data_rejection(ctx, response, case)
    return result


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    valid_requests_accepted,
    invalid_requests_refused,
    unsupported_method,
]
# Small: every operation with a few odd inputs, the whole module in about a minute.
MAX_EXAMPLES = 15
KEYS = ("admin", "crew")
# The live stream answers 200 and then never ends: each call would wait for its timeout.
# tests/test_api_stream.py covers it.
ENDLESS = "/api/v1/stream"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


async def _prepare(url: str) -> dict[str, str]:
    """Migrates and seeds the database; returns a key per role."""
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
        sessions = db.session_factory(engine)
        await seed_registry(sessions)
        keys, _ = await make_keys(sessions)
        clock = Clock()
        alerts = alert_engine(sessions, clock, on_commit=lambda: None)
        for device in ("dev-1", "dev-2"):  # a displaced cover of WATER's, one of DRAIN's
            alerts.evaluate(Reading(device, 1, clock.now, 0.5, 35.0), clock.now)
        await alerts.commit_pending()
        return keys
    finally:
        await engine.dispose()


class ThreadedApi:
    """The app in uvicorn on a thread with its own event loop, engine and sessions."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.base_url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="api-under-fuzz", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        engine = db.create_engine(self.database_url)
        app = create_app(
            registry=CollectorRegistry(),
            readiness=lambda: Readiness({"database": None}),
            sessions=db.session_factory(engine),
            readings=EMPTY,
            admin_key=ADMIN_KEY,
            clock_ms=Clock(),
        )
        try:
            async with serve(app) as url:
                self.base_url = url
                self._ready.set()
                await self._stop.wait()
        finally:
            await engine.dispose()

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API did not start")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass(frozen=True)
class Target:
    base_url: str
    key: str


def _serve(
    backend: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    url = fresh_database_url(backend, tmp_path_factory.mktemp("fuzz"), "api_fuzz")
    keys = asyncio.run(_prepare(url))
    with ThreadedApi(url) as api:
        yield api.base_url, keys


@pytest.fixture(scope="module", params=BACKENDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    yield from _serve(request, tmp_path_factory)


@pytest.fixture(scope="module", params=KEYS)
def target(request: pytest.FixtureRequest, served: tuple[str, dict[str, str]]) -> Target:
    base_url, keys = served
    return Target(base_url, keys[request.param])


@pytest.fixture(scope="module", params=["sqlite"])
def admin_on_sqlite(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    for base_url, keys in _serve(request, tmp_path_factory):
        yield Target(base_url, keys["admin"])


@schemathesis.serializer(XLSX)
def _xlsx(_context: Any, value: Any) -> bytes:
    # Whatever was generated, as the bytes of an upload (a broken workbook, mostly).
    return value if isinstance(value, bytes) else str(value).encode()


def _openapi() -> dict[str, Any]:
    # The schema does not depend on the database: an app whose sessions are never used.
    app = create_app(
        registry=CollectorRegistry(), readiness=lambda: Readiness({}), sessions=async_sessionmaker()
    )
    return app.openapi()


def _schema(*phases: str) -> Any:
    config = schemathesis.Config.from_dict(
        {"phases": {name: {"enabled": name in phases} for name in PHASES}}
    )
    return schemathesis.openapi.from_dict(_openapi(), config=config).exclude(path=ENDLESS)


PHASES = ("examples", "coverage", "fuzzing", "stateful")
# Random requests, with each key on each database.
fuzzing = _schema("examples", "fuzzing")
# Schemathesis's systematic cases (each boundary, each missing field, each enum value, a
# method the path does not take), once: they do not depend on the key or the database.
# Without the two operations that take `tz`: one request per IANA zone is 600 a case.
edges = _schema("coverage").exclude(path=["/api/v1/stats/units", "/api/v1/ledgers/{ledger}"])
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _call(case: Case[Any], target: Target) -> None:
    case.call_and_validate(
        base_url=target.base_url,
        headers={"Authorization": f"Bearer {target.key}"},
        checks=CHECKS,
        timeout=30,
    )


@fuzzing.parametrize()  # type: ignore[untyped-decorator]  # schemathesis is untyped here
@SETTINGS
def test_api_fuzz(case: Case[Any], target: Target) -> None:
    _call(case, target)


@edges.parametrize()  # type: ignore[untyped-decorator]  # schemathesis is untyped here
@SETTINGS
def test_api_edge_cases(case: Case[Any], admin_on_sqlite: Target) -> None:
    _call(case, admin_on_sqlite)


def test_every_operation_but_the_stream_is_fuzzed() -> None:
    fuzzed = {result.ok().path for result in fuzzing.get_all_operations()}
    assert set(_openapi()["paths"]) - fuzzed == {ENDLESS}
