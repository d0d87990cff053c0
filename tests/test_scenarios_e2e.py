"""The shipped scenarios end to end: `smartcover sim --scenario NAME --register --check`
against `smartcover serve` on real Mosquitto and influxd, judged through the API.

Each scenario runs on covers of its own (its own administrative code and device prefix):
alerting orders readings by the device's timestamp and a compressed run stamps the past,
so a second run on the same devices would not move their state, and an open case on a
cover would absorb the next run's alerts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from device_sim.fleet import GeneratedFleet, SimCover
from device_sim.register import register_fleet, service_interval_s
from device_sim.scenario import load_scenario
from device_sim.service_api import ServiceApi
from smartcover.sim_cli import sim
from tests.harness import serving
from tests.servers import InfluxServer

sim_app = typer.Typer(add_completion=False)
sim_app.command(name="sim")(sim)


@sim_app.command()
def version() -> None:
    """A second command, so `sim` is a subcommand as in the real CLI."""


ADMIN_KEY = secrets.token_urlsafe(24)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    """How a test runs a scenario: its speed, and covers and devices of its own."""

    scenario: str
    speed: float
    admin_code: str
    prefix: str

    def args(self, service: str) -> list[str]:
        return [
            "--scenario",
            self.scenario,
            "--check",
            "--speed",
            f"{self.speed:g}",
            "--admin-code",
            self.admin_code,
            "--device-prefix",
            self.prefix,
            "--service",
            service,
        ]

    def covers(self) -> list[SimCover]:
        size = load_scenario(self.scenario).fleet_size
        return GeneratedFleet(size, admin_code=self.admin_code, device_prefix=self.prefix).covers()

    def intervals(self) -> list[int]:
        scenario = load_scenario(self.scenario)
        assert scenario.report_interval_s is not None
        return [service_interval_s(scenario.report_interval_s, self.speed)] * scenario.fleet_size


STRIKE = Run("vehicle_strike", 600, "411221", "e2e-strike")
LORRY = Run("lorry_spike", 600, "411222", "e2e-lorry")
STORM = Run("storm_flooding", 4800, "411223", "e2e-storm")
FIXED = Run("fix_verified", 1, "411224", "e2e-fixed")
RECURRENCE = Run("fix_recurrence", 1, "411225", "e2e-recur")
SILENT = Run("device_silent", 600, "411226", "e2e-silent")
REGISTERED = (STRIKE, LORRY, STORM, FIXED, RECURRENCE, SILENT)
# A lorry over a cover whose sensor's clock is 2 h slow (accepted: not stale), in real
# time. DESIGN §5: the spike is followed by a normal reading within seconds, no alert.
# The report interval is longer than the run: the spike and its recovery are all it sends.
SLOW_CLOCK_LORRY = """
description = "A lorry over cover 0, whose sensor's clock is two hours slow."
fleet_size = 1
duration_s = 8
speed = 1
report_interval_s = 60

[[events]]
kind = "skew"
covers = [0]
offset_s = -7200

[[events]]
kind = "spike"
covers = [0]
at_s = 3
tilt_deg = 35
recover_s = 3

[expect]
readings_stored = 2
alerts = [{ kind = "cover_tilted", cover = 0, count = 0 }]
cases = [{ cover = 0, count = 0 }]
"""
# Never registered: the check must say so.
UNREGISTERED = Run("lorry_spike", 600, "411227", "e2e-nobody")


@dataclass(frozen=True)
class Service:
    base_url: str
    env: dict[str, str]
    slow_clock: Run


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, influx_server: InfluxServer
) -> Iterator[Service]:
    """`smartcover serve` with a short verification window, every run's fleet registered."""
    workdir = tmp_path_factory.mktemp("scenarios")
    slow_clock_file = workdir / "lorry_slow_clock.toml"
    slow_clock_file.write_text(SLOW_CLOCK_LORRY, encoding="utf-8")
    slow_clock = Run(str(slow_clock_file), 1, "411228", "e2e-slowclock")
    with serving(
        workdir,
        influx_server,
        SMARTCOVER_ADMIN_KEY=ADMIN_KEY,
        SMARTCOVER_VERIFY_WINDOW_S="3",
        SMARTCOVER_VERIFY_MIN_READINGS="3",
    ) as running:
        asyncio.run(_register(running.base_url, (*REGISTERED, slow_clock)))
        yield Service(running.base_url, running.env, slow_clock)


async def _register(base_url: str, runs: tuple[Run, ...]) -> None:
    """Every fleet; the service evaluates their first readings, with no wait for a reload."""
    async with ServiceApi(base_url, api_key=ADMIN_KEY) as api:
        for run in runs:
            done = await register_fleet(api, run.covers(), run.intervals())
            assert done.covers_created == len(run.covers()), done


def invoke(service: Service, *args: str, key: str = ADMIN_KEY) -> tuple[int, str]:
    env = {
        "SMARTCOVER_MQTT_URL": service.env["SMARTCOVER_MQTT_URL"],
        "SMARTCOVER_API_KEY": key,
        "COLUMNS": "250",  # the verdicts' table on one line each
    }
    answer = CliRunner().invoke(sim_app, ["sim", *args], env=env)
    return answer.exit_code, " ".join(answer.output.split())


def api_get(service: Service, path: str, **params: str) -> Any:
    answer = httpx.get(
        f"{service.base_url}/api/v1{path}",
        params=params,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def cases_of(service: Service, cover: SimCover) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = api_get(service, "/cases", cover_id=cover.cover_id)["items"]
    return items


def test_vehicle_strike_opens_a_critical_case_for_the_covers_owner(service: Service) -> None:
    code, output = invoke(service, *STRIKE.args(service.base_url), "--register")
    assert code == 0, output
    assert "vehicle_strike: passed" in output
    # Registered by the fixture already: nothing changed, nothing to wait for.
    assert "covers 0 new, 0 updated" in output
    assert "waiting" not in output
    struck = STRIKE.covers()[0]
    [case] = cases_of(service, struck)
    assert (case["unit_code"], case["severity"], case["status"], case["kinds"]) == (
        struck.owner_unit,
        "critical",
        "dispatched",
        ["cover_displaced"],
    )
    for cover in STRIKE.covers()[1:]:
        assert cases_of(service, cover) == []


def _viewer_key(service: Service) -> str:
    answer = subprocess.run(
        [sys.executable, "-m", "smartcover", "keys", "create", "--role", "viewer"],
        env={**os.environ, **service.env},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return answer.stdout.strip()


def test_lorry_spike_is_a_transient_only_checked_with_a_viewer_key(service: Service) -> None:
    viewer = _viewer_key(service)
    code, output = invoke(service, *LORRY.args(service.base_url), key=viewer)
    assert code == 0, output
    assert "lorry_spike: passed" in output
    lorry = LORRY.covers()[3]
    assert api_get(service, "/alerts", cover_id=lorry.cover_id)["items"] == []
    assert cases_of(service, lorry) == []
    metrics = httpx.get(f"{service.base_url}/metrics", timeout=5).text
    transients = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("smartcover_alert_events_total")
        and 'kind="cover_tilted"' in line
        and 'action="transient"' in line
    ]
    assert transients, "transient events are counted"
    assert transients[0] >= 1, "the spike was counted as a transient"


def test_storm_flooding_links_the_flooded_covers_cases_in_one_incident(service: Service) -> None:
    code, output = invoke(service, *STORM.args(service.base_url), "--register")
    assert code == 0, output
    assert "storm_flooding: passed" in output
    covers = STORM.covers()
    flooded = [cases_of(service, covers[index]) for index in (1, 2, 3)]
    assert [len(found) for found in flooded] == [1, 1, 1]
    incidents = {found[0]["incident_id"] for found in flooded}
    assert len(incidents) == 1
    assert None not in incidents
    detail = api_get(service, f"/cases/{flooded[0][0]['id']}")
    assert detail["incident"]["kind"] == "flooding"
    assert detail["incident"]["road"] == covers[1].road
    for index in (0, 4, 5, 6, 7):
        assert cases_of(service, covers[index]) == []


def _run_command(service: Service, run: Run) -> str:
    """`smartcover sim` as an engineer's shell runs it: the key from SMARTCOVER_ADMIN_KEY."""
    env = {
        **os.environ,
        "SMARTCOVER_MQTT_URL": service.env["SMARTCOVER_MQTT_URL"],
        "SMARTCOVER_ADMIN_KEY": ADMIN_KEY,
        "COLUMNS": "200",
    }
    env.pop("SMARTCOVER_API_KEY", None)
    answer = subprocess.run(
        [sys.executable, "-m", "smartcover", "sim", *run.args(service.base_url), "--register"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    output = answer.stdout + answer.stderr
    assert answer.returncode == 0, output
    return output


def test_a_fix_then_normal_readings_is_verified_by_the_sensor(service: Service) -> None:
    assert "fix_verified: passed" in _run_command(service, FIXED)
    [fixed] = cases_of(service, FIXED.covers()[0])
    assert _moves(service, fixed["id"]) == [
        ("system", "open"),
        ("system", "dispatched"),
        ("bootstrap admin", "acknowledged"),
        ("bootstrap admin", "on_site"),
        ("bootstrap admin", "resolved"),
        ("system:sensor", "verified"),
    ]


def test_a_fix_then_a_recurrence_sends_the_case_back_to_dispatched(service: Service) -> None:
    assert "fix_recurrence: passed" in _run_command(service, RECURRENCE)
    [reopened] = cases_of(service, RECURRENCE.covers()[0])
    assert (reopened["status"], reopened["reopened"]) == ("dispatched", 1)
    assert _moves(service, reopened["id"])[-2:] == [
        ("bootstrap admin", "resolved"),
        ("system:sensor", "dispatched"),
    ]


def _moves(service: Service, case_id: int) -> list[tuple[str, str]]:
    timeline = api_get(service, f"/cases/{case_id}")["timeline"]
    return [
        (event["actor"], event["to_status"])
        for event in timeline
        if event["action"] in ("open", "transition")
    ]


def test_device_silent_is_not_checkable_when_compression_hides_the_silence(
    service: Service,
) -> None:
    code, output = invoke(service, *SILENT.args(service.base_url))
    assert code == 0, output
    assert "device_silent: passed" in output
    assert "not checkable" in output
    assert "3 × 60 s" in output
    assert "--speed 6 or less" in output


def test_the_check_fails_for_a_fleet_the_service_does_not_know(service: Service) -> None:
    code, output = invoke(service, *UNREGISTERED.args(service.base_url))
    assert code == 1, output
    assert "e2e-nobody-00000 is not registered" in output
    assert "register the fleet" in output
    assert "lorry_spike: FAILED" in output


def test_registering_needs_an_admin_key(service: Service) -> None:
    code, output = invoke(
        service, *UNREGISTERED.args(service.base_url), "--register", key=_viewer_key(service)
    )
    assert code == 2, output
    assert "the API answered 403" in output
    assert "admin" in output


def test_a_lorry_over_a_cover_whose_clock_is_slow_causes_no_alert(service: Service) -> None:
    code, output = invoke(service, *service.slow_clock.args(service.base_url))
    assert code == 0, output
