"""Shared fixtures: real Mosquitto, InfluxDB and PostgreSQL servers on free loopback ports."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import InfluxServer, MosquittoServer, PostgresServer


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One influxd for the whole session; tests isolate themselves with `influx_db`."""
    with InfluxServer(tmp_path_factory.mktemp("influxd")) as server:
        yield server


@pytest.fixture
def influx_db(influx_server: InfluxServer) -> Iterator[str]:
    """A fresh, uniquely named database on the session's influxd, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    influx_server.create_database(name)
    yield name
    influx_server.drop_database(name)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A broker of the test's own: it starts in a few milliseconds and shares no session."""
    with MosquittoServer(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the session, started only if a test asks for it."""
    # Not under tmp_path_factory: pytest's directories are private to root, and as root
    # the server runs as another user who must be able to reach its data directory.
    base = Path(tempfile.mkdtemp(prefix="smartcover-pg-"))
    try:
        base.chmod(0o755)
        with PostgresServer(base / "pg") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of one test's own, for tests that stop or restart it."""
    base = Path(tempfile.mkdtemp(prefix="smartcover-pg-"))
    try:
        base.chmod(0o755)  # as root, the server runs as another user who must reach it
        with PostgresServer(base / "pg") as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)
