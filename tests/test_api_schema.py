"""Schemathesis against the OpenAPI schema: no 5xx, and every answer as the schema says.

The API runs in uvicorn on a thread of its own (its own event loop), on PostgreSQL, the
stricter of the two databases (it refuses NUL bytes and out-of-range integers that
SQLite would take). Every operation but the endless stream is exercised with an admin
key, so requests reach the handlers instead of stopping at authentication.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.app import Readiness, create_app
from core import db
from core.contract import Reading
from tests.servers import PostgresServer
from tests.test_api_harness import (
    ADMIN_KEY,
    EMPTY,
    Clock,
    QuietServer,
    alert_engine,
    base_url_once_started,
    make_keys,
    seed_registry,
    uvicorn_server,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Small: the point is every operation, each with a few odd inputs, in well under a minute.
MAX_EXAMPLES = 25


def _prepare(url: str) -> None:
    """Migrates and seeds the database: units, covers, devices, keys and one case."""

    async def main() -> None:
        engine = db.create_engine(url)
        try:
            await db.upgrade(engine)
            sessions = db.session_factory(engine)
            await seed_registry(sessions)
            await make_keys(sessions)
            clock = Clock()
            alerts = alert_engine(sessions, clock, on_commit=lambda: None)
            alerts.evaluate(Reading("dev-1", 1, clock.now, 0.5, 35.0), clock.now)
            await alerts.commit_pending()
        finally:
            await engine.dispose()

    asyncio.run(main())


class ThreadedApi:
    """The app in uvicorn on a thread with its own loop, engine and sessions."""

    def __init__(self, url: str) -> None:
        self.database_url = url
        self.base_url = ""
        self._ready = threading.Event()
        self._server: QuietServer | None = None
        self._thread = threading.Thread(target=self._run, name="api-under-test", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        engine = db.create_engine(self.database_url)
        app = create_app(
            registry=CollectorRegistry(),
            readiness=lambda: Readiness({"database": None}),
            sessions=db.session_factory(engine),
            readings=EMPTY,
            admin_key=ADMIN_KEY,
            clock_ms=Clock(),
        )
        self._server = uvicorn_server(app)
        serving = asyncio.create_task(self._server.serve())
        try:
            self.base_url = await base_url_once_started(self._server, serving)
            self._ready.set()
            await serving
        finally:
            await engine.dispose()

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API did not start")
        return self

    def __exit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="module")
def running(postgres_server: PostgresServer) -> Iterator[ThreadedApi]:
    name = f"api_schema_{uuid.uuid4().hex[:10]}"
    postgres_server.create_database(name)
    url = postgres_server.url(name)
    _prepare(url)
    with ThreadedApi(url) as api:
        yield api


XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"


@schemathesis.serializer(XLSX)
def _xlsx(_context: Any, value: Any) -> bytes:
    # Whatever was generated, as the bytes of an upload (a broken workbook, mostly).
    return value if isinstance(value, bytes) else str(value).encode()


def _schema() -> Any:
    # The schema does not depend on the database: an app whose sessions are never used.
    app = create_app(
        registry=CollectorRegistry(),
        readiness=lambda: Readiness({}),
        sessions=async_sessionmaker(),
    )
    return schemathesis.openapi.from_dict(app.openapi()).exclude(path="/api/v1/stream")


schema = _schema()


@schema.parametrize()  # type: ignore[untyped-decorator]  # schemathesis is untyped here
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case: Case[Any], running: ThreadedApi) -> None:
    case.call_and_validate(
        base_url=running.base_url,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        checks=CHECKS,
        timeout=30,
    )
