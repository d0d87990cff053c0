"""`smartcover devices register`: a platform device's source and external id, from the CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from core import db, registry
from smartcover.devices_cli import EXIT_UNUSABLE
from smartcover.devices_cli import app as devices_app
from smartcover.registry_cli import db_app


def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(db_app, name="db")
    app.add_typer(devices_app, name="devices")
    return app


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("SMARTCOVER_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return url


def stored(url: str, device_id: str) -> tuple[str | None, str | None, str | None, int]:
    async def read() -> tuple[str | None, str | None, str | None, int]:
        engine = db.create_engine(url)
        try:
            async with db.transaction(db.session_factory(engine), write=False) as session:
                found = await registry.get_device(session=session, device_id=device_id)
        finally:
            await engine.dispose()
        return found.source, found.external_id, found.model, found.report_interval_s

    return asyncio.run(read())


def test_register_then_update_and_a_taken_id_refused(database: str) -> None:
    runner = CliRunner()
    assert runner.invoke(cli(), ["db", "upgrade"]).exit_code == 0
    args = ["devices", "register", "NB-1", "--source", "ct", "--external-id", "8686"]
    created = runner.invoke(cli(), [*args, "--model", "vendor-m20-hex"])
    assert created.exit_code == 0, created.output
    assert "Device NB-1 registered as ct id 8686." in created.output
    assert stored(database, "NB-1") == ("ct", "8686", "vendor-m20-hex", 3600)
    updated = runner.invoke(cli(), ["devices", "register", "NB-1", "--interval", "600"])
    assert "Device NB-1 updated." in updated.output
    assert stored(database, "NB-1") == ("ct", "8686", "vendor-m20-hex", 600)
    taken = runner.invoke(cli(), ["devices", "register", "NB-2", *args[3:]])
    assert taken.exit_code == EXIT_UNUSABLE
    assert "ct id '8686' is NB-1's already" in taken.output
    bad = runner.invoke(cli(), ["devices", "register", "NB-3", "--external-id", "a b"])
    assert bad.exit_code == EXIT_UNUSABLE
    assert "external_id" in bad.output
