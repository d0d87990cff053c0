"""Scenario files and message generation, without a broker: schema, seeds, reason codes."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from alerting.rules import CRITERIA, Action, AlertKind, CoverRule, KindState, step
from core.contract import STALE_LIMIT_MS, Reason, TelemetryDecoder
from device_sim.errors import ScenarioError
from device_sim.fleet import GeneratedFleet
from device_sim.outcome import differences, predict, timing_problems
from device_sim.scenario import (
    DEVICE_REASONS,
    SCENARIO_DIR,
    Scenario,
    load_scenario,
    shipped_scenarios,
)
from device_sim.timeline import (
    CrewStep,
    LinkChange,
    Plan,
    Publication,
    Timebase,
    malformed_payload,
)

NOW_MS = 1_800_000_000_000  # a fixed "now": generation is a function of it, not the clock
SHIPPED = shipped_scenarios()
REQUIRED = {
    "vehicle_strike",
    "opened_and_stolen",
    "slow_subsidence",
    "storm_flooding",
    "lorry_spike",
    "battery_drain",
    "device_silent",
    "nbiot_buffering",
    "duplicates",
    "clock_skew",
    "malformed",
    "fix_verified",
    "fix_recurrence",
}
# Scenarios whose timestamps are wrong on purpose.
CLOCK_BREAKERS = {"clock_skew", "malformed"}


def plan_of(scenario: Scenario, *, seed: int = 1, now_ms: int = NOW_MS) -> Plan:
    covers = tuple(GeneratedFleet(scenario.fleet_size, seed=seed).covers())
    timebase = Timebase.catching_up(
        real_start_ms=now_ms, duration_s=scenario.duration_s, speed=scenario.speed
    )
    return Plan(scenario, covers, seed, timebase)


def readings_by_device(plan: Plan) -> dict[int, list[tuple[int, dict[str, object]]]]:
    """(sent at, reading) per device, batches unpacked, in the order they were sent."""
    found: dict[int, list[tuple[int, dict[str, object]]]] = defaultdict(list)
    for publication in plan.publications():
        try:
            document = json.loads(publication.payload)
        except ValueError:
            continue
        if not isinstance(document, dict) or publication.intent.startswith("malformed"):
            continue
        for reading in document.get("readings", [document]):
            found[publication.device].append((publication.at_ms, reading))
    return found


def test_every_required_scenario_is_shipped() -> None:
    assert set(SHIPPED) >= REQUIRED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenario_validates_and_declares_expectations(name: str) -> None:
    scenario = load_scenario(name)
    assert scenario.name == name
    assert scenario.expect is not None
    assert scenario.report_interval_s is not None, "expected counts must not depend on the fleet"


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("seed", [1, 7])
def test_declared_counts_are_what_the_service_decoder_makes_of_the_messages(
    name: str, seed: int
) -> None:
    scenario = load_scenario(name)
    assert scenario.expect is not None
    assert differences(scenario.expect, predict(plan_of(scenario, seed=seed))) == []


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("description = 'x'\nfleet_size = 'many'\nduration_s = 60\n", ["fleet_size", "integer"]),
        ("description = 'x'\nfleet_size = 2\n", ["duration_s", "Field required"]),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\ncolour = 'red'\n",
            ["colour", "Extra inputs"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[[events]]\nkind = 'tilt'\ncovers = [0]\ntilt_deg = 200\n",
            ["events[0].tilt.tilt_deg", "180"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[[events]]\nkind = 'earthquake'\ncovers = [0]\n",
            ["events[0]", "earthquake"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[[events]]\nkind = 'silent'\ncovers = [5]\n",
            ["cover 5 >= fleet_size 2"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[expect]\nreadings_stored = 1\ndead_letters = { sticky = 1 }\n",
            ["expect.dead_letters.sticky"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[[expect.alerts]]\nkind = 'cover_gone'\ncover = 0\n",
            ["expect.alerts[0].kind"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[[events]]\nkind = 'crew'\ncovers = [0]\nto = ['open']\n",
            ["events[0].crew.to[0]", "'dispatched'"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[expect]\nreadings_stored = 1\nincidents = [{ covers = [0, 2] }]\n",
            ["cover 2 >= fleet_size 2"],
        ),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 60\n"
            "[expect]\nreadings_stored = 1\ncases = [{ cover = 0, status = 'fixed' }]\n",
            ["expect.cases[0].status"],
        ),
        ("description = 'x'\nfleet_size = = 2\n", ["not valid TOML", "line 2"]),
        (
            "description = 'x'\nfleet_size = 2\nduration_s = 8640000\n",
            ["duration_s", "less than or equal"],
        ),
    ],
)
def test_a_broken_scenario_file_names_the_file_and_the_field(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as raised:
        load_scenario(path)
    message = str(raised.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_an_unknown_scenario_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match="vehicle_strike"):
        load_scenario("no_such_scenario")


@pytest.mark.parametrize("name", SHIPPED)
def test_the_same_seed_gives_the_same_messages(name: str) -> None:
    scenario = load_scenario(name)
    first = list(plan_of(scenario, seed=3).actions())
    again = list(plan_of(scenario, seed=3).actions())
    assert first == again
    other = list(plan_of(scenario, seed=4).actions())
    assert [a.payload for a in first if isinstance(a, Publication)] != [
        a.payload for a in other if isinstance(a, Publication)
    ]


def test_actions_come_in_simulated_time_order_within_the_run() -> None:
    for name in SHIPPED:
        plan = plan_of(load_scenario(name))
        times = [action.at_ms for action in plan.actions()]
        assert times == sorted(times), name
        assert plan.timebase.sim_start_ms <= times[0]
        assert times[-1] <= plan.end_ms + 60_000  # duplicates may trail by their delay


@pytest.mark.parametrize("reason", DEVICE_REASONS)
def test_the_malformed_generator_makes_each_reason_code(reason: Reason) -> None:
    # Simulated time lags the real clock by at most the run's duration.
    lag_ms = 3600 * 1000
    payload = malformed_payload(
        reason,
        device_id="dev-1",
        seq=7,
        ts_ms=NOW_MS - lag_ms,
        future_lead_ms=lag_ms + 86_400_000,
    )
    decoded = TelemetryDecoder().decode("dev-1", payload, NOW_MS)
    assert decoded.readings == []
    assert [rejection.reason for rejection in decoded.rejections] == [reason]


def test_the_malformed_scenario_sends_one_message_per_reason_each_classified_so() -> None:
    plan = plan_of(load_scenario("malformed"))
    decoder = TelemetryDecoder()
    seen = []
    for publication in plan.publications():
        if not publication.intent.startswith("malformed:"):
            continue
        now_ms = round(plan.timebase.real_ms(publication.at_ms))
        decoded = decoder.decode("sim-00000", publication.payload, now_ms)
        declared = Reason(publication.intent.removeprefix("malformed:"))
        assert [r.reason for r in decoded.rejections] == [declared], publication.payload[:200]
        seen.append(declared)
    assert sorted(seen) == sorted(DEVICE_REASONS)


@pytest.mark.parametrize(
    ("name", "speed"),
    [
        (name, speed)
        for name in sorted(set(SHIPPED) - CLOCK_BREAKERS)
        for speed in (1, 60, 3600)
        # Uncompressed multi-day runs add nothing but time to this test.
        if speed > 1 or load_scenario(name).duration_s <= 3 * 3600
    ],
)
def test_timestamps_are_never_after_sending_nor_stale_whatever_the_speed(
    name: str, speed: float
) -> None:
    plan = plan_of(load_scenario(name).with_speed(speed))
    decoder = TelemetryDecoder()
    for device, readings in readings_by_device(plan).items():
        for sent_ms, reading in readings:
            real_ms = plan.timebase.real_ms(sent_ms)
            device_id = plan.covers[device].device_id
            payload = json.dumps({"device_id": device_id, **reading}).encode()
            decoded = decoder.decode(device_id, payload, round(real_ms))
            assert decoded.rejections == []
            ts_ms = decoded.readings[0].ts_ms
            assert real_ms - STALE_LIMIT_MS < ts_ms <= real_ms  # so never future_ts either


def test_simulated_time_catches_up_with_the_clock_at_the_end() -> None:
    timebase = Timebase.catching_up(real_start_ms=NOW_MS, duration_s=3600, speed=60)
    assert timebase.sim_start_ms == NOW_MS - 3600_000 + 60_000
    end = timebase.sim_ms(3600)
    assert timebase.real_ms(end) == pytest.approx(end)  # the end is now, on both clocks
    assert timebase.real_ms(timebase.sim_start_ms) == NOW_MS


def test_nbiot_upload_is_one_batch_out_of_order_within_the_contract() -> None:
    plan = plan_of(load_scenario("nbiot_buffering"))
    batches = [p for p in plan.publications() if p.intent == "batch"]
    assert len(batches) == 1
    batch = json.loads(batches[0].payload)
    assert batch["device_id"] == plan.covers[0].device_id
    seqs = [reading["seq"] for reading in batch["readings"]]
    assert len(seqs) == 30
    assert seqs != sorted(seqs)
    assert sorted(seqs) == list(range(min(seqs), min(seqs) + 30))
    assert len(batches[0].payload) <= 8192
    links = [a for a in plan.actions() if isinstance(a, LinkChange)]
    assert [(link.device, link.online) for link in links] == [(0, False), (0, True)]
    assert links[1].at_ms == batches[0].at_ms  # back online, then the upload


def test_duplicates_repeat_seq_and_ts_exactly() -> None:
    plan = plan_of(load_scenario("duplicates"))
    publications = list(plan.publications())
    copies = [p for p in publications if p.intent == "duplicate"]
    assert len(copies) == 10
    originals = {p.payload: p.at_ms for p in publications if p.intent == "reading"}
    for copy in copies:
        assert copy.at_ms == originals[copy.payload] + 2000


def test_lorry_spike_is_one_reading_then_normal_within_seconds() -> None:
    plan = plan_of(load_scenario("lorry_spike"))
    readings = readings_by_device(plan)[3]
    tilted = [(at, r) for at, r in readings if float(str(r["tilt_deg"])) >= 10]
    assert len(tilted) == 1
    spike_at = tilted[0][0]
    after = [(at, r) for at, r in readings if at > spike_at]
    assert after[0][0] - spike_at == 4000
    assert float(str(after[0][1]["tilt_deg"])) < 5


def test_opened_and_stolen_goes_offline_after_the_opening_and_stays_silent() -> None:
    plan = plan_of(load_scenario("opened_and_stolen"))
    links = [a for a in plan.actions() if isinstance(a, LinkChange)]
    assert [(link.device, link.online) for link in links] == [(1, False)]
    readings = readings_by_device(plan)[1]
    assert max(float(str(r["tilt_deg"])) for _, r in readings) > 89
    assert all(at < links[0].at_ms for at, _ in readings)


def predicted_alerts(plan: Plan) -> Counter[tuple[int, str, str]]:
    """(cover, kind, severity) of every alert the service's own rules raise on the plan's
    readings, taken as the engine takes them: in arrival order, a device's readings older
    than its newest evaluated one left out. The rules' timers (tilt confirmation, device
    silence) run on the service's clock and are not predicted here."""
    decoder = TelemetryDecoder()
    states: dict[tuple[int, AlertKind], KindState] = {}
    newest: dict[int, int] = {}
    raised: Counter[tuple[int, str, str]] = Counter()
    for publication in plan.publications():
        if not publication.is_telemetry:
            continue
        cover = plan.covers[publication.device]
        rule = CoverRule(depth_cm=cover.depth_cm, flood_prone=cover.flood_prone)
        now_ms = round(plan.timebase.real_ms(publication.at_ms))
        for reading in decoder.decode(cover.device_id, publication.payload, now_ms).readings:
            if reading.ts_ms <= newest.get(publication.device, -1):
                continue
            newest[publication.device] = reading.ts_ms
            for criterion in CRITERIA:
                key = (publication.device, criterion.kind)
                states[key], events = step(states.get(key, KindState()), reading, rule, criterion)
                raised.update(
                    (publication.device, event.kind.value, event.severity.value)
                    for event in events
                    if event.action is Action.RAISED
                )
    return raised


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("seed", [1, 7])
def test_declared_alerts_are_what_the_services_rules_make_of_the_readings(
    name: str, seed: int
) -> None:
    scenario = load_scenario(name)
    assert scenario.expect is not None
    raised = predicted_alerts(plan_of(scenario, seed=seed))
    declared = set()
    for expectation in scenario.expect.alerts:
        if expectation.kind == "device_silent":
            continue  # a timer on the service's clock, not a property of the readings
        declared.add((expectation.cover, expectation.kind))
        found = {
            severity: count
            for (cover, kind, severity), count in raised.items()
            if (cover, kind) == (expectation.cover, expectation.kind)
        }
        assert sum(found.values()) == expectation.count, (name, expectation, raised)
        if expectation.severity is not None and expectation.count:
            assert set(found) == {expectation.severity}, (name, expectation, raised)
    undeclared = {(cover, kind) for cover, kind, _ in raised} - declared
    assert not undeclared, f"{name}: alerts raised but not declared: {undeclared}"


@pytest.mark.parametrize("name", SHIPPED)
def test_declared_cases_follow_from_the_declared_alerts(name: str) -> None:
    """One case per cover with alerts in a run (later ones attach to it, DESIGN §6), as
    severe as its most severe alert; device_silent opens minor cases too."""
    scenario = load_scenario(name)
    assert scenario.expect is not None
    severities: dict[int, set[str]] = defaultdict(set)
    for cover, _, severity in predicted_alerts(plan_of(scenario)):
        severities[cover].add(severity)
    for alert in scenario.expect.alerts:
        if alert.kind == "device_silent" and alert.count:
            severities[alert.cover].add("minor")
    for case in scenario.expect.cases:
        assert case.count == (1 if severities.get(case.cover) else 0), (name, case)
        if case.severity is not None:
            worst = max(severities[case.cover], key=["minor", "major", "critical"].index)
            assert case.severity == worst, (name, case)


def test_storm_floods_only_the_road_of_covers_0_to_5_with_a_lag() -> None:
    plan = plan_of(load_scenario("storm_flooding"))
    covers = plan.covers
    assert len({cover.road for cover in covers[:6]}) == 1
    peaks = {}
    for device, readings in readings_by_device(plan).items():
        levels = [(at, float(str(r["water_level_cm"]))) for at, r in readings]
        peak_at, peak = max(levels, key=lambda item: item[1])
        peaks[device] = (peak_at, peak / covers[device].depth_cm)
    assert peaks[2][1] > 1.0  # the lowest well overflows
    assert peaks[2][0] < peaks[1][0] < peaks[0][0]  # the wave moves along the road
    assert all(peaks[d][1] < 0.35 for d in (6, 7))  # other roads stay dry


def test_every_shipped_file_is_in_the_package_directory() -> None:
    assert all((SCENARIO_DIR / f"{name}.toml").is_file() for name in SHIPPED)


def test_the_crew_steps_come_in_the_plan_at_their_time_and_send_nothing() -> None:
    plan = plan_of(load_scenario("fix_verified"))
    [crew] = [action for action in plan.actions() if isinstance(action, CrewStep)]
    assert (crew.at_ms - plan.timebase.sim_start_ms, crew.device) == (3000, 0)
    assert crew.moves == ("acknowledged", "on_site", "resolved")
    without = load_scenario("fix_verified").model_copy(
        update={"events": [e for e in load_scenario("fix_verified").events if e.kind != "crew"]}
    )
    assert list(plan.publications()) == list(plan_of(without).publications())


def test_a_fix_cannot_be_verified_when_time_is_compressed() -> None:
    assert timing_problems(load_scenario("fix_verified")) == []
    [problem] = timing_problems(load_scenario("fix_verified").with_speed(60))
    assert "stamped after it on the service's clock" in problem
    assert "run at --speed 1" in problem
    assert timing_problems(load_scenario("vehicle_strike").with_speed(600)) == []
