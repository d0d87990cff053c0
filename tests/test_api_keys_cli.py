"""`smartcover keys`: create prints the key once, list shows prefixes, revoke ends a key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smartcover.cli import app as cli_app
from smartcover.keys_cli import app as keys_app
from tests.db_fixtures import WATER, add_units, migrated_sessions


def test_keys_cli_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"

    async def prepare() -> None:
        async with migrated_sessions(url) as sessions:
            await add_units(sessions, WATER)

    asyncio.run(prepare())
    monkeypatch.setenv("SMARTCOVER_DATABASE_URL", url)
    monkeypatch.setenv("SMARTCOVER_LOG_LEVEL", "WARNING")
    runner = CliRunner()
    made = runner.invoke(keys_app, ["create", "--role", "crew", "--unit", "WATER", "--name", "Li"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert key.startswith("sck_")
    assert "\n" not in key
    refused = runner.invoke(keys_app, ["create", "--role", "crew"])
    assert refused.exit_code == 2
    assert "needs the unit" in refused.stderr
    listed = runner.invoke(keys_app, ["list"])
    assert listed.exit_code == 0
    assert "Li" in listed.stdout
    assert key[:8] in listed.stdout
    assert key not in listed.stdout
    revoked = runner.invoke(keys_app, ["revoke", "1"])
    assert revoked.exit_code == 0
    assert "revoked" in revoked.stdout
    assert "No keys." in runner.invoke(keys_app, ["list"]).stdout
    assert "Li" in runner.invoke(keys_app, ["list", "--all"]).stdout
    assert runner.invoke(keys_app, ["revoke", "7"]).exit_code == 2


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "list"],
        ["keys", "create", "--role", "viewer"],
        ["keys", "revoke", "1"],
        ["covers", "list"],
        ["units", "list"],
        ["devices", "crew", "WATER"],
    ],
)
def test_commands_on_a_missing_database_leave_no_file_behind(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SMARTCOVER_DATABASE_URL", raising=False)
    monkeypatch.setenv("SMARTCOVER_BROKER_CREW_KEY", "k" * 40)
    result = CliRunner().invoke(cli_app, command)
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # rich wraps long lines
    assert "SMARTCOVER_DATABASE_URL" in message
    assert "smartcover db upgrade" in message
    assert list(tmp_path.iterdir()) == []
