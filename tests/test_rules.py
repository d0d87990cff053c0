"""Table-driven tests of the pure alert state machine (DESIGN §5)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from alerting.rules import (
    CRITERION_OF,
    Action,
    AlertEvent,
    AlertKind,
    CoverRule,
    KindState,
    Severity,
    Thresholds,
    silence,
    step,
    tick,
)
from core.contract import Reading

OPEN, TILTED, DISPLACED = AlertKind.COVER_OPEN, AlertKind.COVER_TILTED, AlertKind.COVER_DISPLACED
WATER, BATTERY, FLAPPING = AlertKind.WATER_HIGH, AlertKind.BATTERY_LOW, AlertKind.FLAPPING
R, C, T = Action.RAISED, Action.CLEARED, Action.TRANSIENT


def reading(
    ts: int,
    *,
    tilt: float = 0.0,
    disp: float = 0.0,
    water: float | None = None,
    battery: float | None = None,
) -> Reading:
    return Reading("dev", ts, ts, tilt, disp, water, battery)


def run(
    kind: AlertKind,
    readings: list[Reading],
    rule: CoverRule | None = None,
    state: KindState | None = None,
) -> tuple[KindState, list[list[Action]]]:
    """Feeds readings in order; returns the final state and each reading's actions."""
    state = state or KindState()
    rule = rule or CoverRule(depth_cm=200)
    actions = []
    for r in readings:
        state, events = step(state, r, rule, CRITERION_OF[kind])
        actions.append([e.action for e in events])
    return state, actions


def series(kind: AlertKind, values: list[float]) -> list[Reading]:
    field = {OPEN: "tilt", TILTED: "tilt", DISPLACED: "disp", WATER: "water", BATTERY: "battery"}[
        kind
    ]
    return [reading(1000 * (i + 1), **{field: v}) for i, v in enumerate(values)]


# (kind, values in order, actions per reading). Water limit: depth 200 − 30 = 170.
TABLE = [
    ("open raised on the first reading", OPEN, [1, 45], [[], [R]]),
    ("open below the limit nothing", OPEN, [44.9, 30], [[], []]),
    ("open clears after 3 under 5", OPEN, [60, 4, 4, 4], [[R], [], [], [C]]),
    (
        "open dead band breaks the clear streak",
        OPEN,
        [60, 4, 4, 6, 4, 4, 4],
        [[R], [], [], [], [], [], [C]],
    ),
    ("open stays while over", OPEN, [60, 70, 50], [[R], [], []]),
    ("tilted needs a second reading", TILTED, [12, 15], [[], [R]]),
    ("tilted lorry spike is transient", TILTED, [0, 30, 0, 0], [[], [], [T], []]),
    ("tilted dead band after a spike is transient too", TILTED, [30, 7], [[], [T]]),
    ("tilted ignores open-range tilt", TILTED, [50, 50], [[], []]),
    ("tilted clears after 3 under 5", TILTED, [12, 12, 1, 2, 3], [[], [R], [], [], [C]]),
    ("displaced on the first reading", DISPLACED, [20], [[R]]),
    (
        "displaced dead band",
        DISPLACED,
        [25, 12, 9, 9, 15, 9, 9, 9],
        [[R], [], [], [], [], [], [], [C]],
    ),
    ("water at the limit", WATER, [100, 170], [[], [R]]),
    ("water clears 10 below for 3", WATER, [175, 165, 160, 160, 160], [[R], [], [], [], [C]]),
    ("battery needs 3 low readings", BATTERY, [3.2, 3.2, 3.2], [[], [], [R]]),
    (
        "battery dead band breaks the raise streak",
        BATTERY,
        [3.2, 3.2, 3.35, 3.2, 3.2],
        [[], [], [], [], []],
    ),
    ("battery clears at once at 3.4", BATTERY, [3.1, 3.1, 3.1, 3.35, 3.4], [[], [], [R], [], [C]]),
]


@pytest.mark.parametrize(
    ("kind", "values", "expected"), [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_rule_table(kind: AlertKind, values: list[float], expected: list[list[Action]]) -> None:
    _, actions = run(kind, series(kind, values))
    assert actions == expected


def test_older_and_repeated_readings_change_nothing() -> None:
    state, _ = run(DISPLACED, [reading(10_000, disp=30)])
    # A buffered NB-IoT reading from before the alarm, normal, must not clear it.
    later, actions = run(
        DISPLACED, [reading(5_000, disp=0)] * 3 + [reading(10_000, disp=0)], state=state
    )
    assert later == state
    assert actions == [[], [], [], []]


def test_readings_without_water_do_not_move_the_water_rule() -> None:
    state, actions = run(WATER, [reading(1000, water=180), reading(2000), reading(3000)])
    assert actions == [[R], [], []]
    assert state.active


def test_no_depth_and_no_limit_means_no_water_rule() -> None:
    _, actions = run(WATER, series(WATER, [500]), rule=CoverRule())
    assert actions == [[]]


def test_cover_own_limit_and_flood_prone() -> None:
    rule = CoverRule(depth_cm=200, water_limit_cm=100, flood_prone=True)
    assert rule.water_limit() == 90  # its own limit, 10 cm stricter on a flood-prone cover
    state = KindState()
    state, events = step(state, reading(1000, water=95), rule, CRITERION_OF[WATER])
    assert [(e.action, e.severity) for e in events] == [(R, Severity.CRITICAL)]
    _, events = step(
        KindState(), reading(1000, water=175), CoverRule(depth_cm=200), CRITERION_OF[WATER]
    )
    assert [(e.action, e.severity) for e in events] == [(R, Severity.MAJOR)]


def test_per_cover_thresholds() -> None:
    rule = CoverRule(thresholds=Thresholds(displacement_raise_mm=5, displacement_clear_mm=2))
    _, actions = run(DISPLACED, series(DISPLACED, [6]), rule=rule)
    assert actions == [[R]]


def test_tilted_raised_by_the_confirmation_timer() -> None:
    rule = CoverRule()
    state, _ = run(TILTED, [reading(1000, tilt=20)])
    state, events = tick(state, 1000 + 29_999, rule, CRITERION_OF[TILTED])
    assert events == []
    state, events = tick(state, 1000 + 30_000, rule, CRITERION_OF[TILTED])
    assert [e.action for e in events] == [R]
    assert state.active
    # Once raised, the second over-limit reading does not raise it again.
    state, events = step(state, reading(40_000, tilt=20), rule, CRITERION_OF[TILTED])
    assert events == []


def test_timer_does_nothing_after_a_normal_reading() -> None:
    state, _ = run(TILTED, [reading(1000, tilt=20), reading(2000, tilt=0)])
    _, events = tick(state, 100_000, CoverRule(), CRITERION_OF[TILTED])
    assert events == []


def test_flapping_becomes_one_alert_and_calms_down() -> None:
    values: list[float] = []
    for _ in range(8):  # eight raise/clear cycles within minutes
        values += [30, 0, 0, 0]
    state, rule, events = KindState(), CoverRule(), []
    for r in series(DISPLACED, values):
        state, new = step(state, r, rule, CRITERION_OF[DISPLACED])
        events += new
    own = [e.action for e in events if e.kind is DISPLACED]
    assert own == [R, C] * 4  # four cycles are alerts, then it is flapping
    flapping = [(e.action, e.subject) for e in events if e.kind is FLAPPING]
    assert flapping == [(R, DISPLACED)]  # one alert instead of the next four cycles
    assert state.flapping
    # An hour without a raise ends it, once.
    calm = [reading(4_000_000 + i * 1000, disp=0) for i in range(3)]
    state, actions = run(DISPLACED, calm, state=state)
    assert actions == [[C], [], []]
    assert not state.flapping


def test_events_carry_kind_severity_time_and_value() -> None:
    _, events = step(KindState(), reading(7000, disp=33.5), CoverRule(), CRITERION_OF[DISPLACED])
    assert events == [AlertEvent(DISPLACED, R, Severity.CRITICAL, 7000, 33.5)]


@pytest.mark.parametrize(
    ("last_seen", "now", "active", "expected"),
    [
        (None, 10**9, False, None),  # never reported: not silent
        (0, 3 * 60_000, False, None),  # exactly three intervals: not yet
        (0, 3 * 60_000 + 1, False, R),
        (0, 3 * 60_000 + 1, True, None),
        (10**6, 10**6 + 1000, True, C),
    ],
)
def test_silence(last_seen: int | None, now: int, active: bool, expected: Action | None) -> None:
    assert silence(last_seen_ms=last_seen, interval_s=60, now_ms=now, active=active) == expected


def test_state_is_immutable() -> None:
    state = KindState()
    with pytest.raises(AttributeError):
        state.active = True  # type: ignore[misc]
    assert replace(state, active=True).active


def test_confirmation_window_runs_on_the_server_clock() -> None:
    # A sensor whose clock is two hours slow: its spike must not look 2 h old to the timer.
    rule, tilted = CoverRule(), CRITERION_OF[TILTED]
    arrived = 10_000_000
    state, _ = step(
        KindState(), reading(arrived - 7_200_000, tilt=20), rule, tilted, received_ms=arrived
    )
    _, events = tick(state, arrived + 1000, rule, tilted)
    assert events == []
    _, events = tick(state, arrived + 30_000, rule, tilted)
    assert [e.action for e in events] == [R]
