"""`SMARTCOVER_BROKER_*`: typed settings of `smartcover devices`, checked at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


@pytest.fixture(autouse=True)
def _no_stray_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # Settings reads a .env in the working directory


def test_broker_settings_come_from_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTCOVER_BROKER_PASSWORD_FILE", "/etc/mosquitto/passwd")
    monkeypatch.setenv("SMARTCOVER_BROKER_RELOAD_CMD", "systemctl reload mosquitto")
    monkeypatch.setenv("SMARTCOVER_BROKER_CREW_KEY", "crew-key-for-tests-0123456789")
    settings = Settings()
    assert settings.broker_password_file == Path("/etc/mosquitto/passwd")
    assert settings.broker_reload_cmd == "systemctl reload mosquitto"
    assert settings.broker_crew_key.get_secret_value() == "crew-key-for-tests-0123456789"
    assert "crew-key" not in repr(settings)  # a secret, never printed


def test_empty_broker_variables_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PASSWORD_FILE", "ACL_FILE", "ACL_TEMPLATE", "PID_FILE", "RELOAD_CMD"):
        monkeypatch.setenv(f"SMARTCOVER_BROKER_{name}", "")
    monkeypatch.setenv("SMARTCOVER_BROKER_CREW_KEY", "")
    settings = Settings()
    assert settings.broker_pid_file is None  # not the current directory
    assert settings.broker_acl_template is None
    assert settings.broker_reload_cmd is None
    assert settings.broker_crew_key.get_secret_value() == ""


def test_a_short_crew_key_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTCOVER_BROKER_CREW_KEY", "too-short")
    with pytest.raises(ValidationError, match="at least 22 characters"):
        Settings()
