"""`smartcover sim` as the command line runs it: listing, dry runs, errors, and --check."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

from core.contract import Reason
from core.settings import MqttEndpoint
from device_sim.check import (
    Counters,
    ObservedAlert,
    ObservedCase,
    RegisteredDevice,
    Status,
    Verdict,
    check,
    parse_metrics,
    silence_note,
)
from device_sim.errors import BrokerError, ProbeError
from device_sim.fleet import GeneratedFleet, NoCredentials, SimCover
from device_sim.runner import CrewOutcome, RunResult, run_scenario
from device_sim.scenario import DEVICE_REASONS, SCENARIO_DIR, load_scenario, shipped_scenarios
from device_sim.service_api import ServiceApi
from device_sim.timeline import CrewStep, Plan, Timebase
from ingest.metrics import IngestMetrics
from smartcover.sim_cli import sim
from tests.harness import serving
from tests.servers import InfluxServer, free_port

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
    with serving(tmp_path_factory.mktemp("sim-check"), influx_server) as running:
        yield Service(running.base_url, running.broker.url, running.env)


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


def test_dry_run_prints_the_crews_steps_among_the_messages() -> None:
    code, output = invoke("--scenario", "fix_recurrence", "--dry-run")
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    [crew] = [line for line in lines if "crew" in line]
    assert crew["crew"] == ["acknowledged", "on_site", "resolved"]
    assert crew["device_id"] == "sim-00000"
    before = lines[: lines.index(crew)]
    # The readings of seconds 0 and 1 and the one the strike sent at 1 s; at 2 s the crew.
    assert len([line for line in before if line["device_id"] == "sim-00000"]) == 3


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
        (["--load", "10", "--register"], "--load runs alone"),
        (["--scenario", "malformed", "--register", "--dry-run"], "not with --dry-run"),
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


def test_check_says_why_alerts_cannot_be_read_without_an_api_key(service: Service) -> None:
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
        env={"SMARTCOVER_MQTT_URL": service.broker_url, "COLUMNS": "250"},
    )
    assert code == 1, output
    text = " ".join(output.split())
    assert "│ readings stored │ 42 │ 42 │ pass │" in text  # the counts are judged anyway
    assert "the API answered 401" in text
    assert "give --api-key, or set SMARTCOVER_API_KEY or SMARTCOVER_ADMIN_KEY" in text
    assert "lorry_spike: FAILED" in text


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

    async with ServiceApi(service.base_url) as probe:
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
    """A service whose counters move as told, and whose alerts and cases are as told,
    before the run and after it."""

    def __init__(
        self,
        *,
        delta: Counters,
        alerts: list[ObservedAlert] | None = None,
        cases: list[ObservedCase] | None = None,
        before: tuple[list[ObservedAlert], list[ObservedCase]] = ([], []),
        registered: dict[str, RegisteredDevice] | None = None,
        ready: str = "",
    ) -> None:
        self.delta = delta
        self.ran = False
        self._alerts = alerts
        self._cases = cases
        self._before = before
        self._registered = registered
        self._ready = ready

    async def readiness(self) -> None:
        if self._ready:
            raise ProbeError(self._ready)

    async def counters(self) -> Counters:
        return self.delta if self.ran else Counters(5, 5, {"schema": 2})

    async def devices(self, device_ids: Sequence[str]) -> dict[str, RegisteredDevice] | None:
        return self._registered

    async def alerts(self, *, cover_ids: Sequence[str]) -> list[ObservedAlert] | None:
        if self._alerts is None:
            return None
        return self._alerts if self.ran else self._before[0]

    async def cases(self, *, cover_ids: Sequence[str]) -> list[ObservedCase] | None:
        if self._cases is None:
            return None
        return self._cases if self.ran else self._before[1]


def _plan(name: str, *, speed: float | None = None) -> Plan:
    scenario = load_scenario(name).with_speed(speed)
    covers = tuple(GeneratedFleet(scenario.fleet_size).covers())
    timebase = Timebase.catching_up(
        real_start_ms=1_800_000_000_000, duration_s=scenario.duration_s, speed=scenario.speed
    )
    return Plan(scenario, covers, 1, timebase)


def _registered(covers: Sequence[SimCover], interval_s: int = 60) -> dict[str, RegisteredDevice]:
    return {c.device_id: RegisteredDevice(c.device_id, c.cover_id, interval_s) for c in covers}


def _runner(
    probe: FakeProbe, plan: Plan, messages: int, crew: tuple[CrewOutcome, ...] = ()
) -> RunResult:
    probe.ran = True
    return RunResult(plan, messages, messages, 0, 0, len(plan.covers), 1.0, crew)


def _table(verdicts: list[Verdict]) -> dict[str, tuple[str, str, Status]]:
    """Verdicts by what they are about, cover numbers left out."""
    return {
        re.sub(r" \(\d{16}\)", "", v.what): (v.expected, v.observed, v.status) for v in verdicts
    }


@pytest.mark.asyncio
async def test_only_the_alerts_and_cases_of_the_run_count() -> None:
    plan = _plan("vehicle_strike")
    expect = plan.scenario.expect
    assert expect is not None
    struck = plan.covers[0]
    old_alert = ObservedAlert(1, "cover_displaced", struck.cover_id, "critical", "cleared")
    old_case = ObservedCase(1, struck.cover_id, "critical", struck.owner_unit, "closed")
    probe = FakeProbe(
        delta=Counters(5 + 121, 5 + 121, {"schema": 2}),
        before=([old_alert], [old_case]),
        alerts=[old_alert, ObservedAlert(7, "cover_displaced", struck.cover_id, "critical")],
        cases=[old_case, ObservedCase(4, struck.cover_id, "major", struck.owner_unit)],
        registered=_registered(plan.covers),
    )

    async def run() -> RunResult:
        return _runner(probe, plan, 121)

    report = await check(expect, plan.covers, run, probe, settle_timeout_s=1, grace_s=0.3)
    table = _table(report.verdicts)
    assert table["readings stored"][2] is Status.PASSED
    assert table["devices bound to the scenario's covers in the registry"][2] is Status.PASSED
    assert table["alert cover_displaced on cover 0, critical"] == ("1", "1", Status.PASSED)
    # The new case is major where critical was expected; the old one does not count.
    assert table[f"case on cover 0 for {struck.owner_unit}, critical"] == (
        "1",
        "0",
        Status.FAILED,
    )
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
    assert {v.note for v in unchecked} == {"the service has no alerts and cases API"}
    assert report.passed


@pytest.mark.asyncio
async def test_an_unregistered_fleet_fails_and_says_how_to_register_it() -> None:
    plan = _plan("vehicle_strike")
    assert plan.scenario.expect is not None
    registered = _registered(plan.covers[1:])
    registered[plan.covers[1].device_id] = RegisteredDevice(plan.covers[1].device_id, None, 60)
    probe = FakeProbe(delta=Counters(126, 126), alerts=[], cases=[], registered=registered)

    async def run() -> RunResult:
        return _runner(probe, plan, 121)

    started = time.monotonic()
    report = await check(plan.scenario.expect, plan.covers, run, probe, settle_timeout_s=1)
    assert time.monotonic() - started < 2, "no grace for alerts that cannot come"
    [registration] = [v for v in report.verdicts if v.what.startswith("devices bound")]
    assert (registration.expected, registration.observed) == ("4", "2")
    assert registration.status is Status.FAILED
    assert registration.note == (
        "sim-00000 is not registered; sim-00001 is on cover none: "
        "register the fleet (--register, or import its census)"
    )


@pytest.mark.asyncio
async def test_case_state_incident_and_crew_are_judged() -> None:
    plan = _plan("storm_flooding")
    expect = plan.scenario.expect
    assert expect is not None
    covers = plan.covers
    flooded = [
        ObservedCase(10 + i, covers[i].cover_id, "major", covers[i].owner_unit, incident_id=3)
        for i in (1, 2, 3)
    ]
    alerts = [ObservedAlert(20 + i, "water_high", covers[i].cover_id, "major") for i in (1, 2, 3)]
    stray = ObservedCase(30, covers[4].cover_id, "major", covers[4].owner_unit, incident_id=3)
    step = CrewStep(plan.timebase.sim_start_ms, 2, ("acknowledged", "on_site"), "")
    crew = (CrewOutcome(step, covers[2].cover_id, 11, ("acknowledged",), "moving case 11: 409"),)
    probe = FakeProbe(
        delta=Counters(389, 389, {"schema": 2}),
        alerts=alerts,
        cases=[*flooded, stray],
        registered=_registered(covers),
    )

    async def run() -> RunResult:
        return _runner(probe, plan, 384, crew)

    report = await check(expect, covers, run, probe, settle_timeout_s=1, grace_s=0.2)
    table = _table(report.verdicts)
    assert table["one incident links the cases of covers 1, 2, 3"] == (
        "one incident",
        "1→3, 2→3, 3→3, 4→3",  # cover 4's case is in the flood too: not what was declared
        Status.FAILED,
    )
    assert table["crew on cover 2: acknowledged → on_site"] == (
        "done",
        "case 11: acknowledged",
        Status.FAILED,
    )
    assert table[f"case on cover 1 for {covers[1].owner_unit}"][2] is Status.PASSED

    probe = FakeProbe(
        delta=Counters(389, 389, {"schema": 2}),
        alerts=alerts,
        cases=flooded,
        registered=_registered(covers),
    )
    report = await check(expect, covers, run, probe, settle_timeout_s=1, grace_s=0.2)
    table = _table(report.verdicts)
    assert table["one incident links the cases of covers 1, 2, 3"][2] is Status.PASSED


@pytest.mark.asyncio
async def test_a_case_state_not_reached_fails_and_an_open_case_before_is_named() -> None:
    plan = _plan("fix_recurrence")
    expect = plan.scenario.expect
    assert expect is not None
    cover = plan.covers[0]
    before = ObservedCase(2, cover.cover_id, "critical", cover.owner_unit, "resolved")
    probe = FakeProbe(
        delta=Counters(25, 25, {"schema": 2}),
        before=([], [before]),
        alerts=[ObservedAlert(9, "cover_displaced", cover.cover_id, "critical")],
        cases=[before],
        registered=_registered(plan.covers),
    )

    async def run() -> RunResult:
        return _runner(probe, plan, 20)

    report = await check(expect, plan.covers, run, probe, settle_timeout_s=1, grace_s=0.2)
    [counted] = [v for v in report.verdicts if v.what.startswith("case on cover 0")]
    assert counted.status is Status.FAILED
    assert counted.note.startswith("case 2 (resolved) was open on the cover before the run")
    table = _table(report.verdicts)
    assert table["cover 0: case status"] == ("dispatched", "-", Status.FAILED)
    assert table["cover 0: case reopened"] == ("1", "-", Status.FAILED)


def test_device_silence_is_checkable_only_when_the_run_is_silent_long_enough() -> None:
    # 3 × 60 s registered interval (+2 s): cover 2 of device_silent falls silent at
    # 10 of 30 simulated minutes, so the run must last 3 minutes of real time after.
    fast = _plan("device_silent", speed=600)
    note = silence_note(fast, 2, 60)
    assert "after 3 × 60 s (the registered interval) without a reading" in note
    assert "run with --speed 6 or less" in note
    assert silence_note(_plan("device_silent", speed=6), 2, 60) == ""
    assert "not at any speed" in silence_note(_plan("device_silent", speed=1), 2, 900)


@pytest.mark.asyncio
async def test_a_silence_the_run_cannot_show_is_not_checkable_nor_the_case_it_opens() -> None:
    plan = _plan("device_silent", speed=600)
    assert plan.scenario.expect is not None
    probe = FakeProbe(
        delta=Counters(105, 105, {"schema": 2}),
        alerts=[],
        cases=[],
        registered=_registered(plan.covers),
    )

    async def run() -> RunResult:
        return _runner(probe, plan, 100)

    report = await check(plan.scenario.expect, plan.covers, run, probe, settle_timeout_s=1)
    unchecked = [v for v in report.verdicts if v.status is Status.UNCHECKED]
    assert [re.sub(r" \(\d{16}\)", "", v.what) for v in unchecked] == [
        "alert device_silent on cover 2, minor",
        f"case on cover 2 for {plan.covers[2].owner_unit}, minor",
    ]
    assert unchecked[1].note.startswith("only device_silent opens it: judged on the service's")
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
