"""`smartcover sim` as the command line runs it: listing, dry runs, errors, and --check."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from core.contract import Reason
from core.settings import MqttEndpoint
from device_sim.check import (
    Counters,
    HttpServiceProbe,
    ObservedAlert,
    ObservedCase,
    Status,
    check,
    parse_metrics,
)
from device_sim.errors import BrokerError, ProbeError
from device_sim.fleet import GeneratedFleet, NoCredentials
from device_sim.runner import RunResult, run_scenario
from device_sim.scenario import DEVICE_REASONS, SCENARIO_DIR, load_scenario, shipped_scenarios
from device_sim.timeline import Plan, Timebase
from ingest.metrics import IngestMetrics
from smartcover.sim_cli import sim
from tests.harness import ServiceProcess, service_env
from tests.servers import InfluxServer, MosquittoServer, free_port

# Mounted the way smartcover/cli.py mounts it.
sim_app = typer.Typer(add_completion=False)
sim_app.command(name="sim")(sim)


@sim_app.command()
def version() -> None:
    """A second command, so `sim` is a subcommand as in the real CLI."""


# The compression the --check tests use: each scenario takes a second or less.
FAST = "600"


@dataclass(frozen=True)
class Service:
    base_url: str
    broker_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, influx_server: InfluxServer
) -> Iterator[Service]:
    """`smartcover serve` on its own broker and database, shared by this module's checks."""
    workdir = tmp_path_factory.mktemp("sim-check")
    database = f"test_{uuid.uuid4().hex[:12]}"
    influx_server.create_database(database)
    with MosquittoServer(workdir / "mosquitto") as broker:
        env = service_env(
            broker,
            influx_server,
            database,
            workdir,
            SMARTCOVER_DATABASE_URL=f"sqlite:///{workdir / 'smartcover.db'}",
        )
        process = ServiceProcess(env, workdir / "service.log")
        process.start()
        base_url = f"http://127.0.0.1:{env['SMARTCOVER_API_PORT']}"
        try:
            _wait_ready(base_url, process)
            yield Service(base_url, broker.url, env)
        finally:
            if process.proc is not None and process.proc.poll() is None:
                process.signal(signal.SIGTERM)
                process.wait(15)
            process.close()
    influx_server.drop_database(database)


def _wait_ready(base_url: str, process: ServiceProcess, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.proc is not None and process.proc.poll() is not None:
            break
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"service not ready within {timeout_s} s:\n{process.log()[-3000:]}")


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    answer = CliRunner().invoke(sim_app, ["sim", *args], env=env or {})
    return answer.exit_code, answer.output


def test_list_names_every_shipped_scenario() -> None:
    code, output = invoke("--list")
    assert code == 0
    for name in ("malformed", "lorry_spike", "storm_flooding"):
        assert name in output


def test_dry_run_prints_what_would_be_sent_without_a_broker() -> None:
    code, output = invoke(
        "--scenario", "malformed", "--dry-run", "--seed", "5", "--device-prefix", "dry"
    )
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 18
    intents = sorted(line["intent"] for line in lines if line["intent"] != "reading")
    assert intents == sorted(f"malformed:{reason.value}" for reason in DEVICE_REASONS)
    assert {line["device_id"] for line in lines} == {"dry-00000", "dry-00001"}


def test_a_fleet_without_scenario_runs_from_a_census(tmp_path: Path) -> None:
    census = tmp_path / "census.csv"
    census.write_text(
        "编号,权属单位,道路,经度,纬度,设备编号,上报周期\n"
        "4112030103000001,drainage,黄河路,111.1,34.7,c-1,60\n"
        "4112030103000002,drainage,黄河路,111.2,34.7,c-2,120\n",
        encoding="utf-8",
    )
    code, output = invoke("--fleet", str(census), "--dry-run", "--speed", "60", "--duration", "600")
    assert code == 0, output
    devices = [json.loads(line)["device_id"] for line in output.splitlines()]
    assert (devices.count("c-1"), devices.count("c-2")) == (10, 5)  # each its own interval


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "no_such"], "no scenario named"),
        (["--check"], "--check needs a --scenario"),
        (["--load", "10", "--scenario", "malformed"], "--load runs alone"),
        (["--scenario", "malformed", "--covers", "1", "--dry-run"], "needs 2 covers"),
        (["--scenario", "malformed", "--duration", "5"], "not with --scenario"),
        (["--centre", "east", "--dry-run"], "--centre must be LON,LAT"),
        (["--speed", "0.5", "--dry-run"], "invalid --speed"),
    ],
)
def test_usage_errors_are_explained(args: list[str], message: str) -> None:
    code, output = invoke(*args)
    assert code == 2
    assert message in " ".join(output.split())


def test_check_fails_every_expectation_when_the_service_is_not_running() -> None:
    code, output = invoke(
        "--scenario", "malformed", "--check", "--service", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 1
    assert "not reachable" in output
    assert "FAILED" in output


def test_check_passes_for_the_malformed_scenario(service: Service) -> None:
    code, output = invoke(
        "--scenario",
        "malformed",
        "--check",
        "--speed",
        FAST,
        "--service",
        service.base_url,
        "--device-prefix",
        "chk-mal",
        env={"SMARTCOVER_MQTT_URL": service.broker_url},
    )
    assert code == 0, output
    assert "malformed: passed" in output


def test_check_passes_for_lorry_spike_readings_with_alerts_not_checkable_yet(
    service: Service,
) -> None:
    code, output = invoke(
        "--scenario",
        "lorry_spike",
        "--check",
        "--speed",
        FAST,
        "--service",
        service.base_url,
        "--device-prefix",
        "chk-lorry",
        env={"SMARTCOVER_MQTT_URL": service.broker_url},
    )
    assert code == 0, output
    assert "lorry_spike: passed" in output
    assert "not checkable" in output


def test_check_fails_when_the_scenario_expects_the_wrong_thing(
    service: Service, tmp_path: Path
) -> None:
    text = (SCENARIO_DIR / "lorry_spike.toml").read_text(encoding="utf-8")
    wrong = tmp_path / "lorry_spike_wrong.toml"
    wrong.write_text(
        text.replace("readings_stored = 42", "readings_stored = 43\ndead_letters = { schema = 1 }"),
        encoding="utf-8",
    )
    code, output = invoke(
        "--scenario",
        str(wrong),
        "--check",
        "--speed",
        FAST,
        "--service",
        service.base_url,
        "--device-prefix",
        "chk-wrong",
        env={"SMARTCOVER_MQTT_URL": service.broker_url},
    )
    assert code == 1, output
    assert "warning: with these options, expected readings_stored 43 != 42" in " ".join(
        output.split()
    )
    assert "lorry_spike_wrong: FAILED" in output


@pytest.mark.asyncio
async def test_check_judges_each_expectation_against_the_running_service(
    service: Service,
) -> None:
    scenario = load_scenario("clock_skew").with_speed(1200)
    assert scenario.expect is not None
    covers = GeneratedFleet(scenario.fleet_size, device_prefix="chk-skew").covers()

    async def run() -> RunResult:
        return await run_scenario(
            scenario,
            covers,
            seed=2,
            endpoint=MqttEndpoint.parse(service.broker_url),
            credentials=NoCredentials(),
        )

    async with HttpServiceProbe(service.base_url) as probe:
        report = await check(scenario.expect, covers, run, probe)
    table = {
        verdict.what: (verdict.expected, verdict.observed, verdict.status)
        for verdict in report.verdicts
    }
    assert table["readings stored"] == ("60", "60", Status.PASSED)
    assert table["messages acknowledged"] == ("80", "80", Status.PASSED)
    assert table["dead letters: future_ts"] == ("10", "10", Status.PASSED)
    assert table["dead letters: stale_ts"] == ("10", "10", Status.PASSED)
    assert table["other dead letters"][2] is Status.PASSED
    assert report.passed


# -- the ServiceProbe seam, with a probe of our own ----------------------------------


class FakeProbe:
    """A service whose counters move as told, and that knows alerts and cases."""

    def __init__(
        self,
        *,
        delta: Counters,
        alerts: list[ObservedAlert] | None = None,
        cases: list[ObservedCase] | None = None,
        ready: str = "",
    ) -> None:
        self.delta = delta
        self.ran = False
        self._alerts = alerts
        self._cases = cases
        self._ready = ready

    async def readiness(self) -> None:
        if self._ready:
            raise ProbeError(self._ready)

    async def counters(self) -> Counters:
        return self.delta if self.ran else Counters(5, 5, {"schema": 2})

    async def alerts(
        self, *, cover_ids: Sequence[str], since_ms: int
    ) -> list[ObservedAlert] | None:
        return self._alerts

    async def cases(self, *, cover_ids: Sequence[str], since_ms: int) -> list[ObservedCase] | None:
        return self._cases


def _plan(name: str) -> Plan:
    scenario = load_scenario(name)
    covers = tuple(GeneratedFleet(scenario.fleet_size).covers())
    timebase = Timebase.catching_up(real_start_ms=0, duration_s=1, speed=1)
    return Plan(scenario, covers, 1, timebase)


def _runner(probe: FakeProbe, plan: Plan, messages: int) -> RunResult:
    probe.ran = True
    return RunResult(plan, messages, messages, 0, 0, len(plan.covers), 1.0)


@pytest.mark.asyncio
async def test_alerts_and_cases_are_judged_once_the_service_reports_them() -> None:
    plan = _plan("vehicle_strike")
    expect = plan.scenario.expect
    assert expect is not None
    struck = plan.covers[0]
    probe = FakeProbe(
        delta=Counters(5 + 121, 5 + 121, {"schema": 2}),
        alerts=[ObservedAlert("cover_displaced", struck.cover_id, "critical")],
        cases=[ObservedCase(struck.cover_id, "major", struck.owner_unit)],
    )

    async def run() -> RunResult:
        return _runner(probe, plan, 121)

    report = await check(expect, plan.covers, run, probe, settle_timeout_s=1)
    statuses = {verdict.what.split(" on ")[0]: verdict.status for verdict in report.verdicts}
    assert statuses["readings stored"] is Status.PASSED
    assert statuses["alert cover_displaced"] is Status.PASSED
    assert statuses["case"] is Status.FAILED  # major, where critical was expected
    assert not report.passed


@pytest.mark.asyncio
async def test_without_alerts_api_they_are_not_checkable_and_do_not_fail() -> None:
    plan = _plan("vehicle_strike")
    assert plan.scenario.expect is not None
    probe = FakeProbe(delta=Counters(126, 126, {"schema": 2}))

    async def run() -> RunResult:
        return _runner(probe, plan, 121)

    report = await check(plan.scenario.expect, plan.covers, run, probe, settle_timeout_s=1)
    unchecked = [v for v in report.verdicts if v.status is Status.UNCHECKED]
    assert len(unchecked) == 2
    assert report.passed


@pytest.mark.asyncio
async def test_a_service_that_never_catches_up_or_dead_letters_too_much_fails() -> None:
    plan = _plan("malformed")
    assert plan.scenario.expect is not None
    reasons = {reason.value: 3.0 for reason in DEVICE_REASONS} | {"store_rejected": 1.0}
    probe = FakeProbe(delta=Counters(15, 20, reasons))

    async def run() -> RunResult:
        return _runner(probe, plan, 18)

    report = await check(plan.scenario.expect, plan.covers, run, probe, settle_timeout_s=0.3)
    failed = {v.what: v for v in report.verdicts if v.status is Status.FAILED}
    assert "service caught up" in failed
    assert failed["other dead letters"].observed == "store_rejected 1"
    assert failed["dead letters: bad_json"].observed == "3"
    assert "dead letters: schema" not in failed  # 3 now, 2 before: the 1 expected


@pytest.mark.asyncio
async def test_nothing_runs_when_the_service_is_not_ready_and_a_broker_failure_fails_all() -> None:
    plan = _plan("malformed")
    expect = plan.scenario.expect
    assert expect is not None
    probe = FakeProbe(delta=Counters(), ready="service not ready: broker not connected")

    async def run() -> RunResult:
        raise AssertionError("must not run")

    report = await check(expect, plan.covers, run, probe)
    assert report.run is None
    assert all(v.status is Status.FAILED for v in report.verdicts)
    assert all(v.note == "service not ready: broker not connected" for v in report.verdicts)
    assert len(report.verdicts) == 2 + len(DEVICE_REASONS)

    async def broken() -> RunResult:
        raise BrokerError("cannot reach 127.0.0.1:1: refused")

    report = await check(expect, plan.covers, broken, FakeProbe(delta=Counters()))
    assert {v.note for v in report.verdicts} == {
        "the scenario did not run: cannot reach 127.0.0.1:1: refused"
    }


def test_the_probe_reads_the_services_own_metric_names() -> None:
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    metrics.count_stored(7)
    metrics.count_acknowledged(9)
    metrics.count_dead_letter(Reason.FUTURE_TS.value, 2)
    counters = parse_metrics(generate_latest(registry).decode())
    assert counters.readings_stored == 7
    assert counters.acknowledged == 9
    assert counters.dead_letters[Reason.FUTURE_TS.value] == 2
    assert counters.dead_letters[Reason.SCHEMA.value] == 0
    with pytest.raises(ProbeError, match="is this smartcover"):
        parse_metrics("# nothing here\nother_metric 1\n")


def test_every_shipped_scenario_is_listed_by_name() -> None:
    assert "malformed" in shipped_scenarios()
