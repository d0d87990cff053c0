"""`smartcover db|units|covers` subcommands against a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from smartcover.registry_cli import EXIT_REJECTED, EXIT_UNUSABLE, covers_app, db_app, units_app

HEADER = "编号,类别代码,权属单位,道路,经度,纬度,设备编号"
GOOD = "4112030101000001,0101,WATER,中州路,112.4539,34.6197,SC-0001"
BROKEN = "4112030101000002,0102,WATER,中州路,112.4539,34.6197,"


def cli() -> typer.Typer:
    # Mounted as smartcover.cli mounts them.
    app = typer.Typer()
    app.add_typer(db_app, name="db")
    app.add_typer(units_app, name="units")
    app.add_typer(covers_app, name="covers")
    return app


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SMARTCOVER_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables at the terminal's width
    monkeypatch.chdir(tmp_path)  # no stray .env
    return CliRunner()


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    return path


def test_commands_refuse_a_database_that_was_not_migrated(runner: CliRunner) -> None:
    result = runner.invoke(cli(), ["units", "list"])
    assert result.exit_code == EXIT_UNUSABLE
    assert "smartcover db upgrade" in result.output


def test_units_and_a_census_from_the_command_line(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(cli(), ["db", "upgrade"]).exit_code == 0
    assert runner.invoke(cli(), ["db", "upgrade"]).exit_code == 0  # idempotent
    created = runner.invoke(
        cli(), ["units", "create", "WATER", "洛阳水务", "--kind", "water_supply"]
    )
    assert created.exit_code == 0, created.output
    listed = runner.invoke(cli(), ["units", "list"])
    assert "洛阳水务" in listed.output

    census = write(tmp_path / "census.csv", HEADER, GOOD, BROKEN)
    errors_csv = tmp_path / "errors.csv"
    rejected = runner.invoke(
        cli(), ["covers", "import", str(census), "--errors-csv", str(errors_csv)]
    )
    assert rejected.exit_code == EXIT_REJECTED
    assert "类别代码" in rejected.output
    assert "Rejected, nothing written" in rejected.output
    assert errors_csv.read_text(encoding="utf-8-sig").splitlines() == [
        "row,column,reason",
        "3,类别代码,0102 differs from the class in the cover number (0101)",
    ]
    assert "No covers." in runner.invoke(cli(), ["covers", "list"]).output

    dry = runner.invoke(cli(), ["covers", "import", str(census), "--dry-run", "--skip-invalid"])
    assert dry.exit_code == EXIT_REJECTED
    assert "Dry run" in dry.output
    assert "No covers." in runner.invoke(cli(), ["covers", "list"]).output

    imported = runner.invoke(cli(), ["covers", "import", str(write(census, HEADER, GOOD))])
    assert imported.exit_code == 0, imported.output
    assert "Imported 1 rows: 1 covers new, 1 roads new, 1 devices new" in imported.output
    again = runner.invoke(cli(), ["covers", "import", str(census)])
    assert "Nothing changed: all 1 valid rows match the registry." in again.output
    listed = runner.invoke(cli(), ["covers", "list", "--owner", "WATER"])
    assert "4112030101000001" in listed.output
    assert "SC-0001" in listed.output


def test_an_unusable_file_exits_2_with_its_reasons(runner: CliRunner, tmp_path: Path) -> None:
    assert runner.invoke(cli(), ["db", "upgrade"]).exit_code == 0
    census = write(tmp_path / "census.csv", HEADER + ",颜色", GOOD + ",红")
    result = runner.invoke(cli(), ["covers", "import", str(census)])
    assert result.exit_code == EXIT_UNUSABLE
    assert "颜色" in result.output
    assert "unknown column" in result.output
